# Outbound relay to other networks: routes, the SMTP client, the durable queue and bounces (DSNs).
