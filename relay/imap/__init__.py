# IMAP mailbox serving: parser, sans-I/O protocol core, FETCH/SEARCH/scan helpers and the asyncio server.
