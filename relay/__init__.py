# Network side of the hub: SMTP ingress now; mailbox serving and outbound relay as they land.
from .smtp_server import HubSMTP, SmtpContext

__all__ = ["HubSMTP", "SmtpContext"]
