# Durable single-instance message storage: spool files, blobs, the SQLite index, site records.
from .errors import StorageError, StorageFull
from .site_cache import SiteCache
from .sites import Site, SiteError
from .spool import SpoolFile
from .store import Delivery, Downloads, MailboxEntry, MessageMeta, Storage

__all__ = ["Delivery", "Downloads", "MailboxEntry", "MessageMeta", "Site", "SiteCache", "SiteError", "SpoolFile",
           "Storage", "StorageError", "StorageFull"]
