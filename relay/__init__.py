# Network side of the hub: SMTP ingress, POP3 and IMAP mailbox serving; outbound relay later.
from .imap_server import ImapContext
from .pop3_server import Pop3Context
from .smtp_server import HubSMTP, SmtpContext

__all__ = ["HubSMTP", "ImapContext", "Pop3Context", "SmtpContext"]
