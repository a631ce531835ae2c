"""gRPC front door: the edge (request id, admission, auth, status, access log), the servicer
(proto ⇄ domain), the server with health, reflection and TLS."""
