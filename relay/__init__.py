# Network side of the hub: SMTP ingress, POP3 and IMAP mailbox serving, the outbound relay.
# Import the modules themselves (relay.smtp.server, ...): the package imports nothing, so that the
# command-line tools, which need only relay.outbound.routes for the config, start fast.
