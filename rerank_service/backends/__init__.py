"""Backends answer rerank requests: an upstream HTTP API, or models run in-process."""
