# SMTP ingest: the aiosmtpd-based server, its command syntax, replies, policy checks, pacing and DATA stream.
