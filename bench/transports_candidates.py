"""The candidates of `make bench-transports`, by name: shared by the benchmark (bench/transports.py,
in .venv) and its client processes (bench/transports_client.py, in .venv-transports), so it
imports nothing."""

TODAY, TODAY_H11_COMPILED = "today", "today-h11-mypyc"
HTTPX_AIOHTTP_LAYER, HTTPX_AIOHTTP_CLIENT = "httpx-aiohttp-layer", "httpx-aiohttp-client"
AIOHTTP, HTTPX2, HTTPX = "aiohttp", "httpx2", "httpx"
CANDIDATES = (TODAY, TODAY_H11_COMPILED, HTTPX_AIOHTTP_LAYER, HTTPX_AIOHTTP_CLIENT, AIOHTTP, HTTPX2, HTTPX)
