# Dot-stuffed message framing shared by the protocols that send a message as lines ending in
# "." CRLF: POP3 RETR/TOP (RFC 1939 sec. 3) and the outbound SMTP client's DATA (RFC 5321 sec.
# 4.5.2). Chunk by chunk, so a message of any size streams in bounded memory. Sans-I/O.
# (The receiving side, SMTP DATA's decoder, is relay/smtp/stream.py.)

__all__ = ["dot_stuff", "message_terminator"]


def dot_stuff(chunk: bytes, at_line_start: bool) -> tuple[bytes, bool]:
    """Byte-stuff one chunk of a message: every line that starts with "." gets another "." in
    front. Pass the returned flag with the next chunk."""
    if not chunk:
        return chunk, at_line_start
    out = chunk.replace(b"\n.", b"\n..")
    if at_line_start and chunk[:1] == b".":
        out = b"." + out
    return out, chunk.endswith(b"\n")


def message_terminator(at_line_start: bool) -> bytes:
    """The closing ".\\r\\n", with a CRLF first if the message did not end with one."""
    return b".\r\n" if at_line_start else b"\r\n.\r\n"
