"""The HTTP front door: the rerank APIs existing SDKs speak, on the gRPC server's engine and loop."""
