# One message being received: decoded bytes go to a spool file through the size limit and the
# header scanner, and to a streaming MIME parser when listeners want its events. Never raises from
# write(): failures are remembered so that the caller can drain the client's data and then give
# the matching reply.
from storage import MessageMeta, Site, Storage, StorageError

from .message_scan import HeaderScanner
from .mime_stream import MimeStreamParser


class IncomingMessage:
    __slots__ = ("spool", "headers", "size", "max_size", "too_big", "too_big_reply", "error", "mime")

    def __init__(self, storage: Storage, max_size: int, trace_header, too_big_reply: str, listeners=()) -> None:
        self.headers = HeaderScanner()
        # the parser sees the bytes the client sent (after the hub's trace header)
        self.mime = MimeStreamParser(_Listeners(listeners)) if listeners else None
        self.size = 0
        self.max_size = max_size
        self.too_big = False
        self.too_big_reply = too_big_reply   # the size limit's reply (message size, or mailbox room)
        self.error: StorageError | None = None
        self.spool = None
        try:
            self.spool = storage.new_spool()
            self.spool.write(trace_header(self.spool.queue_id))
        except StorageError as exc:
            self._fail(exc)

    @property
    def queue_id(self) -> str:
        return self.spool.queue_id if self.spool else "-"

    @property
    def failed(self) -> bool:
        if self.error is None and self.spool is not None and self.spool.error is not None:
            self._fail(self.spool.error)
        return self.too_big or self.error is not None

    @property
    def backlogged(self) -> bool:
        return self.spool is not None and self.spool.backlogged

    async def room(self) -> None:
        await self.spool.room()

    def write(self, data: bytes) -> None:
        if self.failed:
            return
        self.size += len(data)
        if not self.headers.done:   # before the size check, so that a refusal can name the mail
            self.headers.feed(data)
        if self.size > self.max_size:
            self.too_big = True
            self.discard()
            return
        if self.mime is not None:
            self.mime.feed(data)
        self.spool.write(data)

    def end_of_data(self) -> None:
        """The client's data is complete: the MIME listeners get their last events."""
        if self.mime is not None and not self.failed:
            self.mime.close()

    def meta(self, mail_from: str, sender: Site | None, dot_lines: bool, peer: str | None) -> MessageMeta:
        self.headers.close()
        h = self.headers
        return MessageMeta(mail_from=mail_from, sender_site=sender.id if sender else None, dot_lines=dot_lines,
                           message_id=h.message_id, set_id=h.set_id, set_part=h.set_part,
                           set_total=h.set_total, sender_name=sender.name if sender else None, peer=peer)

    def _fail(self, exc: StorageError) -> None:
        self.error = exc
        self.discard()

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.discard()


class _Listeners:
    """Hands each MIME parser event to several listeners, in order."""
    __slots__ = ("listeners",)

    def __init__(self, listeners) -> None:
        self.listeners = tuple(listeners)

    def part_start(self, part) -> None:
        for listener in self.listeners:
            listener.part_start(part)

    def part_body(self, part, data) -> None:
        for listener in self.listeners:
            listener.part_body(part, data)

    def part_end(self, part) -> None:
        for listener in self.listeners:
            listener.part_end(part)
