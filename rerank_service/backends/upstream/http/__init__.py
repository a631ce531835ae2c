"""The upstream HTTP layer: one connection pool, one network layer, one transport."""
