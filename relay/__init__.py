# Network side of the hub: SMTP ingress, POP3 and IMAP mailbox serving, the outbound relay.
from .imap_server import ImapContext
from .outbound_queue import OutboundQueue
from .pop3_server import Pop3Context
from .smtp_server import HubSMTP, SmtpContext

__all__ = ["HubSMTP", "ImapContext", "OutboundQueue", "Pop3Context", "SmtpContext"]
