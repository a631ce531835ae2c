"""The call pipeline both front doors (gRPC, HTTP) run every call through: the caller,
admission, the deadline, the engine, and the record of the call (call.py)."""
