"""Generated code for proto package rerank.v1 (see proto/rerank/v1/rerank.proto).

Regenerate with `make generate`; never edit the *_pb2* files by hand.
"""
