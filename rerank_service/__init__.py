"""rerank-service: a contract-first gRPC microservice for document reranking."""

__version__ = "0.1.0"
