"""The upstream HTTP layer.

transport.py  `UpstreamTransport.post_json`, the one door every upstream call goes through
budget.py     how long an attempt may take (upstream timeout vs the caller's deadline)
exchange.py   one HTTP exchange: the request, sending it, reading its body
body.py       the body read whole within a size bound, gzip decoded
failures.py   what a failed attempt becomes: a metrics label and the service's error
attempt.py    the per-attempt metric
connections.py  direct on the lean pool, or through a proxy (proxies.py); TLS trust (tls.py)
pool.py       an O(1) connection pool for httpcore; network.py: its asyncio network layer
"""
