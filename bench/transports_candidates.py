"""The candidates of `make bench-transports`, by name: shared by the benchmark (bench/transports.py,
in .venv) and its client processes (bench/transports_client.py, in .venv-transports), so it
imports nothing."""

TODAY, HTTPX_AIOHTTP_CLIENT = "today", "httpx-aiohttp-client"
AIOHTTP, HTTPX2, HTTPX = "aiohttp", "httpx2", "httpx"
CANDIDATES = (TODAY, HTTPX_AIOHTTP_CLIENT, AIOHTTP, HTTPX2, HTTPX)
