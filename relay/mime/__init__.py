# Streaming MIME: the incremental parser, the structure recorder, body decoders and content sniffing.
