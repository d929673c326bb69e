# Durable single-instance message storage: spool files, blobs, the SQLite index, site records.
# The public names are loaded on first use (PEP 562), so that the index writer process, which
# imports storage.writer_child, does not load the event-loop side (asyncio, aiosqlite) it never
# uses: it stays at about half the memory.
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same names, for type checkers (which do not run __getattr__)
    from .errors import AlreadyMarked as AlreadyMarked
    from .errors import MailboxLimitReached as MailboxLimitReached
    from .errors import StorageError as StorageError
    from .errors import StorageFull as StorageFull
    from .records import Delivery as Delivery
    from .records import Downloads as Downloads
    from .records import MailboxEntry as MailboxEntry
    from .records import MessageMeta as MessageMeta
    from .site_cache import LoginBusy as LoginBusy
    from .site_cache import SiteCache as SiteCache
    from .sites import Site as Site
    from .sites import SiteError as SiteError
    from .spool import SpoolFile as SpoolFile
    from .store import Storage as Storage

_EXPORTS = {
    "StorageError": ".errors",
    "StorageFull": ".errors",
    "MailboxLimitReached": ".errors",
    "AlreadyMarked": ".errors",
    "Delivery": ".records",
    "Downloads": ".records",
    "MailboxEntry": ".records",
    "MessageMeta": ".records",
    "SiteCache": ".site_cache",
    "LoginBusy": ".site_cache",
    "Site": ".sites",
    "SiteError": ".sites",
    "SpoolFile": ".spool",
    "Storage": ".store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
