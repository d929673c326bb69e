# POP3 mailbox serving: the sans-I/O protocol core and its thin asyncio server.
