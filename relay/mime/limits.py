# The caps of the MIME structure recorded at ingest and rendered for IMAP (BODYSTRUCTURE, BODY,
# ENVELOPE, part numbers), in one place; docs/limits.md lists them with what happens past each.
# Plain constants, no logic. Must never: be changed without docs/limits.md.

# Past these, the rest of a multipart is one application/octet-stream part covering its remaining
# children, a part nested deeper is one application/octet-stream part, and a message/rfc822 part
# whose message does not fit is described as application/octet-stream.
STRUCTURE_MAX_PARTS = 500  # parts described per message
STRUCTURE_MAX_DEPTH = 16  # nesting (multipart children and message/rfc822 messages)
STRUCTURE_MAX_VALUE = 1024  # characters kept of one header value or parameter
STRUCTURE_MAX_PARAMS = 16  # parameters kept per Content-Type and Content-Disposition
STRUCTURE_MAX_TEXT = 128 * 1024  # characters of header values and parameters per message
