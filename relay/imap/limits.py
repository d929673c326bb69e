# Every limit that bounds what one IMAP client can make the hub do (memory, CPU, event-loop time),
# in one place; docs/limits.md lists them with what happens past each. Plain constants, no logic.
# Must never: be changed without docs/limits.md (the wording clients see names several of them).

# ---- input ------------------------------------------------------------------------------------
PRE_LOGIN_MAX_COMMAND = 8 * 1024  # octets of one command with its literals before login;
# a longer line gets BAD, a longer LITERAL+ gets BYE
PRE_LOGIN_MAX_BUFFER = 16 * 1024  # octets received and not yet answered before login; BYE past it
MAX_COMMAND = 64 * 1024  # the same after login
MAX_BUFFER = 256 * 1024
MAX_LIST_DEPTH = 64  # parenthesized lists nested in one command; BAD past it
MAX_TOKENS = 2048  # atoms, strings, literals and lists in one command; BAD past it
# (bounds the loop time tokenizing one command: ~1-3 ms)

# ---- FETCH ------------------------------------------------------------------------------------
MAX_FETCH_ITEMS = 64  # distinct data items per FETCH (repeats count once); NO [LIMIT]
FETCH_CHUNK = 64 * 1024  # response bytes gathered before they are handed to the socket
MAX_HEADER = 256 * 1024  # a header block read into memory (top-level or a part's); what
# lies beyond is neither searched nor filtered by HEADER.FIELDS

# The MIME structure caps (BODYSTRUCTURE, BODY, ENVELOPE, part numbers) are relay/mime/limits.py.

# ---- SEARCH -----------------------------------------------------------------------------------
MAX_SEARCH_DEPTH = 32  # nesting of ( ), NOT and OR; BAD past it
MAX_SEARCH_KEYS = 256  # search keys per command; BAD past it
SEARCH_MAX_BYTES = 256 * 1024 * 1024  # header and body octets one SEARCH may read; NO [LIMIT] past it
SEARCH_MAX_SECONDS = 10.0  # time one SEARCH may take reading messages; NO [LIMIT] past it
SEARCH_THREADS = 2  # text searches running at once in the whole process (others wait)
SEARCH_BATCH = 100  # messages looked at between two chances for other clients

# ---- event-loop time ----------------------------------------------------------------------------
SLICE_SECONDS = 0.005  # a session's adapter lets other clients run after this much work
