# The mailbox operator actions that change state (`mailhub mailbox delete|return|export`), on a
# Storage: the running hub's (control commands mailbox.remove, mailbox.return, mailbox.audit,
# registered here) or, with the hub stopped, one the command line opens itself under the data
# folder's lock. Both ways take the same path: removals go through Storage.remove_entries (one
# transaction with the audit record; the hub's POP3 and IMAP sessions hear of them), a return
# stores its RFC 3464 notice before the mail goes (a crash in between repeats the notice, never
# loses it), an export's audit record is written through the index writer.
# Must never: remove anything without its audit record, put any of the mail's content into a
# notice, or trust a request's fields unchecked (they come over the control socket).
import asyncio
import logging
import pwd
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from relay.outbound.bounce import returned_notice
from storage import Delivery, MessageMeta, Storage, audit, mailbox_admin
from storage.records import Removal

from .config import Config
from .control import PEER_UID, ControlError, ControlServer

log = logging.getLogger("mailhub.mailbox")
MAX_UIDS = 2000  # mailbox entries per removal request (a request line is at most 64 KB)
MAX_TEXT = 300  # characters of an actor name or a reason
T = TypeVar("T")


async def read_index(storage: Storage, function: Callable[..., T], *args: Any) -> T:
    """function(conn, *args) on a read-only connection of its own, in a worker thread (SQLite
    never blocks the event loop)."""

    def run() -> T:
        conn = storage.index.connect_readonly()
        try:
            return function(conn, *args)
        finally:
            conn.close()

    return await asyncio.get_running_loop().run_in_executor(storage.executor, run)


async def remove(storage: Storage, site: str, uids: list[int], event: str, actor: str, detail: str | None) -> dict:
    """Remove these entries of a site's mailbox, audited as `event` by `actor`; {"removed": [uids]}."""
    if event != audit.DELETED_BY_OPERATOR:  # expiry and returns have their own paths
        raise ControlError(f'"event" must be {audit.DELETED_BY_OPERATOR}')
    site_id = await read_index(storage, mailbox_admin.site_id_of, site)
    if site_id is None:
        raise ControlError(f"no site named {site!r}")
    removed = await storage.remove_entries(site_id, uids, Removal(event, actor, detail))
    log.info("site=%s: %d mail(s) removed (%s by %s)", site, len(removed), event, actor)
    return {"removed": removed}


async def return_mail(storage: Storage, reporting_mta: str, site: str, queue_id: str, actor: str, reason: str) -> dict:
    """Return a mail in a site's mailbox to its sender: the notice (RFC 3464, naming the mail
    without its content) into the sender's mailbox, or queued for the relay when the sender is not
    a site of this hub; then every entry of the mail in that mailbox removed (audited RETURNED)."""
    site_id = await read_index(storage, mailbox_admin.site_id_of, site)
    if site_id is None:
        raise ControlError(f"no site named {site!r}")
    entries = await read_index(storage, _entries_of, site_id, queue_id)
    if not entries:
        raise ControlError(f"no mail {queue_id} in the mailbox of {site}")
    first = entries[0]
    if not first.sender:
        raise ControlError(
            f"mail {queue_id} has the null sender <>: there is no one to return it to; delete it instead"
        )
    notice = returned_notice(
        reporting_mta=reporting_mta,
        sender=first.sender,
        queue_id=queue_id,
        arrival=first.arrived_at,
        rcpt=first.rcpt,
        reason=reason,
        message_id=first.message_id,
        set_id=first.set_id,
        set_part=first.set_part,
        set_total=first.set_total,
    )
    sender_site = await read_index(storage, mailbox_admin.site_of_address, first.sender)
    meta = MessageMeta("", None, notice.startswith(b".") or b"\n." in notice)
    spool = storage.new_spool()
    spool.write(notice)
    try:
        if sender_site is not None:
            await storage.commit(spool, meta, [Delivery(sender_site[0], first.sender, sender_site[1])])
        else:
            await storage.commit(spool, meta, [], remote=[first.sender])
    except BaseException:
        spool.discard()
        raise
    where = f"site {sender_site[1]}" if sender_site is not None else "the relay"
    detail = f"notice {spool.queue_id} to <{first.sender}> ({where}): {reason}"[:MAX_TEXT]
    removed = await storage.remove_entries(site_id, [e.uid for e in entries], Removal(audit.RETURNED, actor, detail))
    log.info("site=%s: mail %s returned to <%s> by %s (notice %s)", site, queue_id, first.sender, actor, spool.queue_id)
    return {"removed": removed, "notice": spool.queue_id, "sender": first.sender, "via": where}


def _entries_of(conn: sqlite3.Connection, site_id: int, queue_id: str) -> list[mailbox_admin.AdminEntry]:
    return mailbox_admin.site_entries(conn, site_id, queue_ids=[queue_id])


async def record_export(storage: Storage, rows: list[list[Any]]) -> dict:
    """Audit records of exports ([site, queue_id, message_id, study, size, sha256, actor, detail])."""
    await storage.audit([audit.row(audit.EXPORTED, *r) for r in rows])
    return {"recorded": len(rows)}


# ---- the control commands (the running hub) --------------------------------------------------------


def _verified_actor(declared: str, uid: object) -> str:
    """The operator name the command line sent, with the user the kernel names for the peer of the
    control socket when that is another one (`alice (uid 0 root)` under sudo): a client can claim
    any name, not another uid."""
    if type(uid) is not int:
        return declared
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    return declared if name == declared else f"{declared} (uid {uid} {name})"


def _text(request: dict, key: str, required: bool = True) -> str | None:
    value = request.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise ControlError(f'"{key}" is a string of 1 to {MAX_TEXT} characters')
    return value


def register_mailbox_commands(control: ControlServer, storage: Storage, cfg: Config) -> None:
    reporting_mta = cfg.relay.hostname or cfg.hostname

    async def remove_command(request: dict) -> dict:
        uids = request.get("uids")
        if not isinstance(uids, list) or len(uids) > MAX_UIDS or not all(type(u) is int for u in uids):
            raise ControlError(f'"uids" is a list of at most {MAX_UIDS} whole numbers')
        site, event, actor = _text(request, "site"), _text(request, "event"), _text(request, "actor")
        assert site is not None and event is not None and actor is not None  # required
        actor = _verified_actor(actor, request.get(PEER_UID))
        return await remove(storage, site, uids, event, actor, _text(request, "detail", required=False))

    async def return_command(request: dict) -> dict:
        site, queue_id, actor = _text(request, "site"), _text(request, "queue_id"), _text(request, "actor")
        reason = _text(request, "reason")
        assert site is not None and queue_id is not None and actor is not None and reason is not None
        actor = _verified_actor(actor, request.get(PEER_UID))
        return await return_mail(storage, reporting_mta, site, queue_id, actor, reason)

    async def audit_command(request: dict) -> dict:
        rows = request.get("rows")
        if not isinstance(rows, list) or len(rows) > 1000 or not all(_export_row(r) for r in rows):
            raise ControlError(
                '"rows" is a list of at most 1000 rows [site, queue ID, Message-ID, study, size, SHA-256,'
                " actor, detail] (strings of up to 1000 characters or null; size a whole number or null)"
            )
        uid = request.get(PEER_UID)
        rows = [[*r[:6], _verified_actor(r[6], uid) if r[6] else r[6], r[7]] for r in rows]
        return await record_export(storage, rows)

    control.register("mailbox.remove", remove_command)
    control.register("mailbox.return", return_command)
    control.register("mailbox.audit", audit_command)


def _export_row(row: object) -> bool:
    """An exported record as mailbox.audit takes it (see audit_command)."""
    if not isinstance(row, list) or len(row) != 8:
        return False
    size = row[4]
    if size is not None and (type(size) is not int or size < 0):
        return False
    return all(v is None or (isinstance(v, str) and len(v) <= 1000) for i, v in enumerate(row) if i != 4)
