"""Protobuf packages of rerank-service; the import path mirrors the proto path."""
