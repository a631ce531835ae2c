"""What every front door (gRPC, HTTP) shares: admission, caller keys, the access-log line."""
