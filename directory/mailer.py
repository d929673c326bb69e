# Directory mails: the signed participant list as a reply to a site that mailed directory@<domain>,
# and as an update to every site when the list changed (sites added or removed, addresses or keys
# changed). Each mail is stored through the normal spool -> sync -> commit path; an update is
# committed together with the mark "this directory version was sent", so a restart neither sends
# it twice nor loses it. A site is answered at most once per directory.min_request_interval (each
# answer is a signed mail in its mailbox: a gateway asking in a loop must not fill it, nor keep
# the hub signing).
import asyncio
import logging
import os
import time
from email.utils import formatdate

from mailhub import metrics
from storage import Delivery, MessageMeta, Site, Storage, db
from storage.sites import list_sites

from .document import read_document, to_json, to_text
from .hub_key import HubKey
from .signing import mixed_part, signed_body

log = logging.getLogger("mailhub.directory")
_POLL_SECONDS = 1.0
SENT_VERSION = "directory_sent_version"


def directory_mail(document: dict, hub_key: HubKey, sender: str, to: str, subject: str,
                   in_reply_to: str | None = None, now: float | None = None) -> bytes:
    """A whole RFC 5322 message (CRLF) holding the signed directory."""
    inner = mixed_part(to_text(document), to_json(document).encode("ascii"), "application/json",
                       "directory.json")
    content_type, body = signed_body(inner, hub_key.sign_detached)
    domain = sender.rpartition("@")[2]
    headers = [
        f"From: DICOM Mail Hub directory <{sender}>",
        f"To: {to}",
        f"Subject: {subject}",
        f"Date: {formatdate(now, localtime=False)}",
        f"Message-ID: <directory-{document['version']}-{os.urandom(8).hex()}@{domain}>",
        *([f"In-Reply-To: {in_reply_to}"] if in_reply_to else []),
        "Auto-Submitted: " + ("auto-replied" if in_reply_to is not None else "auto-generated"),
        f"X-DICOM-Mail-Hub-Directory-Version: {document['version']}",
        "MIME-Version: 1.0",
        f"Content-Type: {content_type}",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + body


class DirectoryMailer:
    """Server side: answers directory requests and sends updates after changes."""

    def __init__(self, cfg, storage: Storage, hub_key: HubKey):
        self.cfg = cfg
        self.storage = storage
        self.hub_key = hub_key
        self.local_part = cfg.directory.address
        self._asked_at: dict[int, float] = {}   # site id -> when its last request was taken (monotonic)

    def is_directory_address(self, address: str) -> bool:
        local, _, domain = address.rpartition("@")
        return local.lower() == self.local_part and domain.lower() in self.cfg.domain

    def take_request(self, site_id: int, now: float) -> float:
        """0 if the site may be answered now (the request is then counted, answered or not), else
        the seconds until it may ask again."""
        interval = self.cfg.directory.min_request_interval
        last = self._asked_at.get(site_id)
        if last is not None and now - last < interval:
            return interval - (now - last)
        self._asked_at[site_id] = now
        return 0.0

    async def reply(self, site: Site, address: str, request_id: str | None) -> str:
        """Store the signed directory in the requesting site's mailbox; returns the queue ID."""
        sender = f"{self.local_part}@{address.rpartition('@')[2].lower()}"
        data = await self._in_thread(self._mail, sender, address, "Participant directory", request_id or "")
        queue_id = await self.storage.store_generated(data, _meta(data), [Delivery(site.id, address, site.name)])
        metrics.directory_mail("reply")
        return queue_id

    def start_updates(self) -> asyncio.Task | None:
        """Start the update loop (when configured); the first start records the present version
        as already sent, so that only later changes trigger updates."""
        conn = db.connect(self.cfg.data_dir)
        try:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) SELECT ?, value FROM meta"
                         " WHERE key = 'directory_version'", (SENT_VERSION,))
        finally:
            conn.close()
        if not self.cfg.directory.notify_on_change:
            return None
        return asyncio.create_task(self._update_loop())

    async def _update_loop(self) -> None:
        conn = db.connect(self.cfg.data_dir)
        try:
            while True:
                await asyncio.sleep(_POLL_SECONDS)
                try:
                    await self._send_update_if_changed(conn)
                except Exception:
                    log.exception("directory update failed; retrying")
        finally:
            conn.close()

    async def _send_update_if_changed(self, conn) -> None:
        conn.execute("BEGIN")  # the version and the sites it counts, read together
        try:
            rows = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('directory_version', ?)",
                                     (SENT_VERSION,)))
            version = rows["directory_version"]
            if rows.get(SENT_VERSION) == version:
                return
            recipients = [(s, s.addresses[0]) for s in list_sites(conn) if s.addresses]
        finally:
            conn.execute("COMMIT")
        if recipients:
            sender = f"{self.local_part}@{self.cfg.domain[0]}"
            data = await self._in_thread(self._mail, sender, "undisclosed-recipients:;",
                                         "Participant directory update", None)
            queue_id = await self.storage.store_generated(
                data, _meta(data), [Delivery(site.id, address, site.name) for site, address in recipients],
                mark=(SENT_VERSION, version))
            metrics.directory_mail("update")
            log.info("directory version %d sent to %d site(s) as qid=%s", version, len(recipients), queue_id)
        else:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (SENT_VERSION, version))

    def _mail(self, sender: str, to: str, subject: str, in_reply_to: str | None) -> bytes:
        """Worker thread: read the index, build and sign the mail."""
        conn = db.connect(self.cfg.data_dir)
        try:
            document = read_document(conn, self.hub_key.fingerprint, self.cfg.domain, self.local_part)
        finally:
            conn.close()
        return directory_mail(document, self.hub_key, sender, to, subject, in_reply_to, time.time())

    async def _in_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def _meta(data: bytes) -> MessageMeta:
    return MessageMeta(mail_from="", sender_site=None, dot_lines=b"\r\n." in b"\r\n" + data)
