# Network side of the hub: SMTP ingress and POP3 mailbox serving now; IMAP and outbound relay later.
from .pop3_server import Pop3Context
from .smtp_server import HubSMTP, SmtpContext

__all__ = ["HubSMTP", "Pop3Context", "SmtpContext"]
