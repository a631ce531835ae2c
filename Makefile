# rerank-service: the two commands (`make serve`, `make test`) and the pieces they use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUF := .ci/tools/node_modules/.bin/buf
PROTO_FILES := $(shell find proto -name '*.proto' | sort)
PY_STUBS := clients/python/src

.PHONY: install install-upstream install-dev infinity infinity-optimum chart-tools curl bench bench-local bench-streaming bench-reliability bench-routes bench-abuse bench-perf bench-http bench-workers bench-cache bench-tenants litellm jaeger promtool serve test test-python lint typecheck docs generate check-generated buf-lint buf-breaking tools clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

## install: the server with its stubs and the local backend (PyTorch: a large first download);
## a stamp: installed again only when a pyproject or the client's code changes, so that
## `make serve` needs no network once installed
CLIENT_FILES := $(shell find clients/python -name '*.py' -o -name pyproject.toml -o -name '*.pyi')
install: $(VENV)/.installed-local
$(VENV)/.installed-local: pyproject.toml $(CLIENT_FILES) | $(VENV)/bin/python
	$(PY) -m pip install --quiet ./clients/python -e '.[local]'
	touch $@

## install-upstream: the light install, for the upstream backend only (no PyTorch)
install-upstream: $(VENV)/bin/python
	$(PY) -m pip install --quiet ./clients/python -e .

## install-dev: the server, stubs (editable), the local backend and every test and lint tool
install-dev: $(VENV)/bin/python
	$(PY) -m pip install --quiet -e ./clients/python -e '.[dev,local]'

## infinity: a real Infinity server (infinity-emb, its own PyTorch) in .venv-infinity, apart from the
## service's pins, for tests/integration/test_real_upstreams.py; installed once (a stamp), again when its pins change
INFINITY_VENV := .venv-infinity
INFINITY_REQUIREMENTS := tests/support/infinity/requirements.txt
infinity: $(INFINITY_VENV)/.installed
$(INFINITY_VENV)/.installed: $(INFINITY_REQUIREMENTS)
	$(PYTHON) -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/python -m pip install --quiet -r $(INFINITY_REQUIREMENTS)
	touch $@

## infinity-optimum: Infinity's optimum (ONNX Runtime) engine in .venv-infinity, for make bench-local only
## (bench/local_engines.py): its packages go on top with --no-deps, so the tests' pins stay as they are;
## installed once (a stamp), again when its pins or Infinity's change
INFINITY_OPTIMUM_REQUIREMENTS := bench/infinity_optimum/requirements.txt
infinity-optimum: $(INFINITY_VENV)/.optimum-installed
$(INFINITY_VENV)/.optimum-installed: $(INFINITY_VENV)/.installed $(INFINITY_OPTIMUM_REQUIREMENTS)
	$(INFINITY_VENV)/bin/python -m pip install --quiet --no-deps -r $(INFINITY_OPTIMUM_REQUIREMENTS)
	$(INFINITY_VENV)/bin/python -m pip check
	touch $@

## redis: a real Redis server for the tests' shared state (the score cache, the callers' limits): Debian's
## redis-server package (tests/support/install-redis.sh; idempotent, the system service kept from starting)
.PHONY: redis
redis:
	bash tests/support/install-redis.sh

## curl: the HTTP front door's tests drive curl itself (Debian's package, when absent)
curl:
	command -v curl >/dev/null 2>&1 || bash .ci/apt-install-quiet.sh curl

## chart-tools: helm and kubeconform (Go module proxy) and the Kubernetes JSON schemas (the
## kubernetes-validate wheel from PyPI, hash-pinned) into .ci/tools, for tests/deploy; pinned, idempotent
chart-tools: $(VENV)/bin/python
	bash deploy/install-chart-tools.sh

## image: the upstream-only image (deploy/Dockerfile) as localhost/rerank-service:VERSION without a registry
## or a daemon: buildah on a Debian base made by mmdebstrap, wheels from the host's pip (deploy/build-image.sh;
## root; installs buildah and mmdebstrap with apt-get if missing); reused while its inputs are unchanged
.PHONY: image
image: $(VENV)/bin/python
	HOST_PYTHON=$(PY) bash deploy/build-image.sh

## litellm: LiteLLM's proxy, uvicorn and Starlette in .venv-litellm, apart from the service's pins, for
## bench-http; installed once (a stamp), again when its pins change
LITELLM_VENV := .venv-litellm
LITELLM_REQUIREMENTS := bench/litellm/requirements.txt
litellm: $(LITELLM_VENV)/.installed
$(LITELLM_VENV)/.installed: $(LITELLM_REQUIREMENTS)
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install --quiet -r $(LITELLM_REQUIREMENTS)
	touch $@

## jaeger: the trace backend of the tracing tests, Jaeger's all-in-one binary, built from its Go module
## (pinned in tests/support/jaeger/go.mod) into .ci/tools/go/bin; built once (minutes), again when the pin changes
JAEGER := .ci/tools/go/bin/jaeger
jaeger: $(JAEGER)
$(JAEGER): tests/support/jaeger/go.mod tests/support/jaeger/go.sum
	bash .ci/tools/install-go-tools.sh jaeger

## promtool: Prometheus's rule checker, for the alert rules (deploy/prometheus), pinned, into .ci/tools/go/bin
PROMTOOL := .ci/tools/go/bin/promtool
promtool: $(PROMTOOL)
$(PROMTOOL):
	bash .ci/tools/install-go-tools.sh promtool

## serve: install and start the server on its defaults
serve: install
	$(VENV)/bin/rerank-service serve

## tools: pinned CLI tools: buf (npm), grpcurl, grpc_health_probe, promtool and jaeger (Go module proxy)
tools: $(BUF)
	bash .ci/tools/install-go-tools.sh
$(BUF): .ci/tools/package.json .ci/tools/package-lock.json
	npm ci --prefix .ci/tools --no-audit --no-fund --loglevel=error
	touch $(BUF)

## generate: regenerate every checked-in stub from proto/ (Python here, other languages by their generate.sh)
generate: install-dev tools
	rm -f $(PY_STUBS)/rerank/v1/*_pb2*.py $(PY_STUBS)/rerank/v1/*_pb2*.pyi $(PY_STUBS)/rerank/v1/*.binpb
	$(PY) -m grpc_tools.protoc -Iproto \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		--python_out=$(PY_STUBS) --grpc_python_out=$(PY_STUBS) \
		--mypy_out=$(PY_STUBS) --mypy_grpc_out=$(PY_STUBS) \
		--include_source_info --descriptor_set_out=$(PY_STUBS)/rerank/v1/rerank_descriptor_set.binpb \
		$(PROTO_FILES)
	@for script in $(wildcard clients/*/generate.sh); do echo "== $$script"; bash "$$script" || exit 1; done

## check-generated: fail when the checked-in code under clients/ differs from what proto/ generates
check-generated: generate
	@git add --intent-to-add --all -- clients >/dev/null 2>&1 || true
	@git diff --exit-code --stat -- clients \
		|| { echo "generated code drifted from proto/: run 'make generate' and commit"; exit 1; }

buf-lint: tools
	$(BUF) lint
	$(BUF) format --diff --exit-code

buf-breaking: tools
	bash .ci/buf-breaking.sh $(BUF)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install-dev
	$(VENV)/bin/mypy

## docs: regenerate docs/CONFIGURATION.md from the settings' declarations (rerank_service/config)
docs: install-dev
	$(PY) -m rerank_service.config.reference > docs/CONFIGURATION.md
	$(PY) -m rerank_service.api.http.openapi > docs/openapi.json

## test: install everything and run every check and test
test: install-dev infinity redis curl jaeger promtool chart-tools buf-lint buf-breaking check-generated lint typecheck
	$(VENV)/bin/pytest

## test-python: the Python part of `make test`, for a machine without Node.js or Java (Go only builds the
## tracing tests' Jaeger, once): ruff, mypy and
## every test except those that need other toolchains or root, which are not collected (so none is skipped):
## the buf checks (tests/contract), the chart and the image (tests/deploy), the Go, Node and Java client
## suites and grpcurl/grpc_health_probe (tests/clients/test_other_languages.py, test_operator_tools.py);
## PYTEST_ARGS: more pytest arguments, e.g. PYTEST_ARGS="tests/unit -x"
NEEDS_OTHER_TOOLCHAINS := tests/contract tests/deploy tests/clients/test_other_languages.py \
	tests/clients/test_operator_tools.py
test-python: install-dev infinity redis curl jaeger lint typecheck
	$(VENV)/bin/pytest $(addprefix --ignore=,$(NEEDS_OTHER_TOOLCHAINS)) $(PYTEST_ARGS)

## bench-local: the local backend against the direct model, micro-batching on against off; its engines
## (torch, onnx, onnx int8) against Infinity's (torch, optimum) and transformers called directly
## (BENCH_LOCAL_ARGS: more flags of bench.local_engines, e.g. "--device cuda --dtypes float32,bfloat16")
bench-local: install-dev infinity-optimum
	HF_HUB_OFFLINE=1 $(PY) -m bench.local_backend
	HF_HUB_OFFLINE=1 $(PY) -m bench.local_engines $(BENCH_LOCAL_ARGS)

## bench-streaming: one RerankStream against sequential and concurrent unary calls
bench-streaming: install-dev
	$(PY) -m bench.streaming

## bench-reliability: every fault, overload and shutdown scenario against a live server; rewrites docs/RELIABILITY.md
bench-reliability: install-dev
	$(PY) -m bench.reliability

## bench-routes: a hostile caller beside a victim, failover to a fallback deployment and a down upstream,
## against live routed servers; rewrites docs/RELIABILITY.md
bench-routes: install-dev
	$(PY) -m bench.routes

## bench-abuse: what a hostile caller can make the server hold (big calls, big streams, silent
## streams) and what a victim sees meanwhile; rewrites docs/RELIABILITY.md
bench-abuse: install-dev
	$(PY) -m bench.abuse

## bench-perf: the upstream service against canned, minimal-proxy and direct baselines
## (ghz, nginx, py-spy; writes docs/PERFORMANCE.md; BENCH_QUICK=1 for a short smoke run)
bench-perf: install-dev
	bash bench/install-ghz.sh
	bash bench/install-nginx.sh
	$(PY) -m pip install --quiet py-spy==0.4.3
	$(PY) -m bench.perf

## bench-http: the HTTP front door against gRPC in one process, aiohttp against uvicorn + Starlette,
## LiteLLM's proxy against the front door (hey, ghz, nginx; writes docs/PERFORMANCE.md; BENCH_QUICK=1 for a smoke run)
bench-http: install-dev litellm
	bash bench/install-ghz.sh
	bash bench/install-hey.sh
	bash bench/install-nginx.sh
	$(PY) -m bench.http

## bench-workers: `serve --workers 2` against one process, interleaved: a 2 s upstream at 256 and 1,024
## callers against Little's law, nginx at c=64 with CPU per call (ghz, nginx; writes docs/PERFORMANCE.md;
## BENCH_QUICK=1 for a smoke run)
bench-workers: install-dev
	bash bench/install-ghz.sh
	bash bench/install-nginx.sh
	$(PY) -m bench.workers

## bench-cache: the score cache at c=64 on the fast upstream: a 100%-hit workload against the no-cache
## service, a 0%-hit one with the cache on and off, both on the Redis tier too (interleaved rounds, CPU per
## call); a 50%-hit workload's latency behind a 2 s upstream (ghz, nginx, redis-server; writes
## docs/PERFORMANCE.md; BENCH_QUICK=1 for a smoke run)
bench-cache: install-dev redis
	bash bench/install-ghz.sh
	bash bench/install-nginx.sh
	$(PY) -m bench.cache

## bench-long-documents: long_documents CHUNK against TRUNCATE with the bundled model on a generated corpus
## of long documents (MRR, NDCG@10), and CHUNK's cost on short ones; writes docs/LOCAL_MODELS.md
.PHONY: bench-long-documents
bench-long-documents: install-dev
	$(PY) -m bench.long_documents

## bench-tenants: CPU per call with 100 callers and their limits against no callers, and with the limits in
## Redis, at c=64 on the fast upstream (interleaved rounds; ghz, nginx, redis-server; writes docs/TENANTS.md;
## BENCH_QUICK=1 for a smoke run)
bench-tenants: install-dev redis
	bash bench/install-ghz.sh
	bash bench/install-nginx.sh
	$(PY) -m bench.tenants

## bench-tracing: CPU per call with tracing off, on with every call sampled and with 1% sampled, exporting to
## a real Jaeger, at c=64 on the fast upstream (interleaved rounds; ghz, nginx, jaeger; writes
## docs/PERFORMANCE.md; BENCH_QUICK=1 for a smoke run)
.PHONY: bench-tracing
bench-tracing: install-dev jaeger
	bash bench/install-ghz.sh
	bash bench/install-nginx.sh
	$(PY) -m bench.tracing

## bench-transports: the upstream HTTP clients compared at c=16 and c=64 on the fast upstream: today's
## transport (on aiohttp), httpx over httpx-aiohttp, aiohttp bare, httpx2 and httpx, client CPU per
## call and requests/s in interleaved rounds; the clients in .venv-transports (the service and
## bench/transports/requirements.txt; installed once, again when those change) (nginx; writes
## docs/PERFORMANCE.md; BENCH_QUICK=1 for a smoke run)
TRANSPORTS_VENV := .venv-transports
TRANSPORTS_REQUIREMENTS := bench/transports/requirements.txt
.PHONY: bench-transports
bench-transports: install-dev $(TRANSPORTS_VENV)/.installed
	bash bench/install-nginx.sh
	$(PY) -m bench.transports
$(TRANSPORTS_VENV)/.installed: $(TRANSPORTS_REQUIREMENTS) pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(TRANSPORTS_VENV)
	$(TRANSPORTS_VENV)/bin/python -m pip install --quiet ./clients/python -e . -r $(TRANSPORTS_REQUIREMENTS)
	touch $@

## bench: every benchmark
bench: bench-local bench-streaming bench-reliability bench-routes bench-abuse bench-perf bench-http bench-workers bench-cache bench-tenants bench-long-documents bench-transports bench-tracing

clean:
	rm -rf $(VENV) $(INFINITY_VENV) .venv-litellm .venv-transports .ci/tools/node_modules .ci/tools/kubernetes-json-schema .ci/tools/images .mypy_cache .pytest_cache .ruff_cache
