"""The front doors: `grpc/` (the contract over gRPC) and `http/` (the DashScope and Cohere
HTTP APIs). They translate their wire formats to and from the call pipeline
(rerank_service/pipeline/) and never import each other."""
