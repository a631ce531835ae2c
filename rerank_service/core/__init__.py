"""The rerank logic every front door and backend shares: domain types, engine, chunking,
the stream window and the Backend protocol. No protobuf, no HTTP, no torch here."""
