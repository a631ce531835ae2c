"""The upstream HTTP layer, on aiohttp's client.

transport.py    `UpstreamTransport.post_json`, the one door every upstream call goes through
budget.py       how long an attempt may take (the upstream timeout after the pool's wait,
                the caller's deadline, a probe's bound)
exchange.py     one HTTP exchange: the request, sending it, reading its body
body.py         the body read whole within a size bound, gzip decoded
failures.py     what a failed attempt becomes: a metrics label and the service's error
attempt.py      the per-attempt metric
connections.py  the deployment's aiohttp session (its pool) and its route: direct, or
                through a proxy (proxies.py); TLS trust (tls.py)
"""
