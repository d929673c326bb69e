# Benchmark / third-party comparison tooling for DICOM Mail Hub (load clients,
# throw-away Postfix/Dovecot/aiosmtpd servers). Not part of the hub itself.
