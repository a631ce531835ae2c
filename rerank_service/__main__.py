"""`python -m rerank_service` is the same as the `rerank-service` command."""

from rerank_service.cli import main

raise SystemExit(main())
