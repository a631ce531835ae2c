"""gRPC front door: server, servicer (proto ⇄ domain), interceptors, status mapping, reflection, TLS."""
