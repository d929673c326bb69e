# One message being received: decoded bytes go to a spool file through the size limit, the
# header scanner and the streaming MIME parser, whose structure record is stored with the message;
# more listeners (the encryption policy) share the parser. Once a listener has refused the mail
# (its `reply` is set) the parser stops: the mail will not be stored, so the rest of it need not be
# parsed. Never raises from write(): failures are remembered so that the caller can drain the
# client's data and then give the matching reply.
import logging
from collections.abc import Callable

from relay.mime.stream import Listeners, MimeStreamParser
from relay.mime.structure import StructureRecorder
from relay.smtp.message_scan import HeaderScanner, LineLengthCheck
from storage import MessageMeta, Site, SpoolFile, Storage, StorageError

log = logging.getLogger("mailhub.ingest")


class UncheckedMessage(StorageError):
    """MIME parsing failed while listeners that must see the whole mail (the encryption policy)
    were attached: the mail is refused rather than let through unchecked."""

    reply = "451 4.3.0 Internal error, try again later"


class IncomingMessage:
    __slots__ = (
        "spool",
        "headers",
        "lines",
        "mime",
        "structure",
        "checked",
        "size",
        "max_size",
        "too_big",
        "too_big_reply",
        "error",
        "_judges",
    )

    def __init__(
        self,
        storage: Storage,
        max_size: int,
        trace_header: Callable[[str], bytes],
        too_big_reply: str,
        listeners=(),
    ) -> None:
        self.headers = HeaderScanner()
        self.lines = LineLengthCheck()  # the data's lines only: the hub's trace header is folded
        # the parser sees the stored bytes (the hub's trace header first): structure offsets are
        # offsets in the blob
        self.structure = StructureRecorder()
        self.mime: MimeStreamParser | None = MimeStreamParser(
            Listeners(self.structure, *listeners) if listeners else self.structure
        )
        self.checked = bool(listeners)
        self._judges = [listener for listener in listeners if hasattr(listener, "reply")]
        self.size = 0
        self.max_size = max_size
        self.too_big = False
        self.too_big_reply = too_big_reply  # the size limit's reply (message size, or mailbox room)
        self.error: StorageError | None = None
        self.spool: SpoolFile | None = None
        try:
            self.spool = storage.new_spool()
            trace = trace_header(self.spool.queue_id)
            self.spool.write(trace)
            self._parse(trace)  # structure offsets are offsets in the stored file
        except StorageError as exc:
            self._fail(exc)

    @property
    def queue_id(self) -> str:
        return self.spool.queue_id if self.spool else "-"

    @property
    def spooled(self) -> SpoolFile:
        """The spool file of a message that has not failed (one without a spool has)."""
        assert self.spool is not None
        return self.spool

    @property
    def failed(self) -> bool:
        if self.error is None and self.spool is not None and self.spool.error is not None:
            self._fail(self.spool.error)
        return self.too_big or self.lines.too_long or self.error is not None

    @property
    def backlogged(self) -> bool:
        return self.spool is not None and self.spool.backlogged

    async def room(self) -> None:
        """Wait until the spool takes more (awaited only while `backlogged`, which needs a spool)."""
        assert self.spool is not None
        await self.spool.room()

    def write(self, data: bytes) -> None:
        if self.failed:
            return
        self.size += len(data)
        if not self.headers.done:  # before the size check, so that a refusal can name the mail
            self.headers.feed(data)
        if self.size > self.max_size:
            self.too_big = True
            self.discard()
            return
        self.lines.feed(data)
        if self.lines.too_long:  # POP3 and IMAP clients could not take it back: refused at the end
            self.discard()
            return
        self._parse(data)
        assert self.spool is not None  # (without one, the message failed at its start)
        self.spool.write(data)

    def end_of_data(self) -> None:
        """The client's data is complete: the MIME listeners get their last events."""
        if not self.failed:
            self._parse(None)

    def _parse(self, data: bytes | None) -> None:
        """Feed the MIME parser (None: end of data; a second end is ignored)."""
        if self.mime is None:
            return
        try:
            if data is None:
                self.mime.close()
            else:
                self.mime.feed(data)
                if any(judge.reply is not None for judge in self._judges):
                    self.mime = None  # refused: nothing more to learn from the rest
        except Exception:  # a bug here must not cost the mail: it is stored without its structure
            log.exception("qid=%s: MIME parsing stopped", self.queue_id)
            self.mime = None
            if self.checked:
                self._fail(UncheckedMessage())

    def meta(self, mail_from: str, sender: Site | None, dot_lines: bool, peer: str | None) -> MessageMeta:
        self.headers.close()
        h = self.headers
        self._parse(None)
        return MessageMeta(
            mail_from=mail_from,
            sender_site=sender.id if sender else None,
            dot_lines=dot_lines,
            message_id=h.message_id,
            set_id=h.set_id,
            set_part=h.set_part,
            set_total=h.set_total,
            sender_name=sender.name if sender else None,
            peer=peer,
            structure=self.structure.structure if self.mime is not None else None,
        )

    def _fail(self, exc: StorageError) -> None:
        self.error = exc
        self.discard()

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.discard()
