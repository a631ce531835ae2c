"""What users of rerank-service run besides the server itself.

`rerank_service.testing.fake_upstream` is a real HTTP server that speaks the hosted
rerank API's wire formats with deterministic scores and injectable faults. Point the
upstream backend at it to try the service without an API key, to run the client
suites of other languages, or to rehearse failures:

    python -m rerank_service.testing.fake_upstream --port 8080 --latency 0.02

Its Python interface: `FakeUpstream` (start/stop or a `with` block; `url`, `inject`,
`always`, `cycle`, `go_down`/`come_back`, `requests`), `Fault` (one injected answer),
and the scoring it answers with (`fake_score`, `expected_ranking`, `total_tokens`).
"""
