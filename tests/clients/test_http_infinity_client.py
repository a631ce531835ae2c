"""The Cohere routes through Infinity's own Python client, `infinity-client` from PyPI.

docs/HTTP.md says `/v1/rerank` serves Infinity's clients: the client, pointed at the service
by its base URL (`http://HOST:PORT/v1`, to which it adds `/rerank`), must read our answers
into its typed `ReRankResult` and surface our errors as its `UnexpectedStatus`.

The client pins httpx<0.28 and the service httpx 0.28, so it cannot be a dev dependency:
it lives in .venv-infinity beside Infinity's server (tests/support/infinity/requirements.txt,
`make infinity`), and runs there in a child process. A missing one fails loudly here,
rather than skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from tests.clients.test_http_sdks import (
    CALLER_KEY,
    DOCUMENTS,
    MODEL,
    QUERY,
    RANKING,
    TOKENS,
    WRONG_KEY,
    FrontDoor,
)
from tests.clients.test_http_sdks import front_door as front_door
from tests.support.infinity import INFINITY_VENV

INFINITY_CLIENT_PYTHON = INFINITY_VENV / "bin" / "python"

# Each call's RerankInput fields in, what the client made of the answer out (a JSON list).
CLIENT_SCRIPT = """
import json, sys
from infinity_client import AuthenticatedClient, errors
from infinity_client.api.default import rerank
from infinity_client.models import RerankInput
from infinity_client.types import Unset

base_url, key, calls = json.loads(sys.argv[1])
client = AuthenticatedClient(base_url=base_url, token=key, raise_on_unexpected_status=True)
out = []
for call in calls:
    try:
        parsed = rerank.sync(client=client, body=RerankInput(**call))
    except errors.UnexpectedStatus as error:
        out.append({"status": error.status_code, "body": json.loads(error.content)})
        continue
    out.append({
        "type": type(parsed).__name__,
        "model": parsed.model,
        "id": parsed.id,
        "results": [
            [r.index, r.relevance_score, None if isinstance(r.document, Unset) else r.document]
            for r in parsed.results
        ],
        "usage": {"prompt_tokens": parsed.usage.prompt_tokens, "total_tokens": parsed.usage.total_tokens},
    })
print(json.dumps(out))
"""


def infinity_client(front_door: FrontDoor, calls: list[dict[str, Any]], api_key: str = CALLER_KEY) -> Any:
    """What infinity-client's `rerank.sync` returned (or raised) for each call, in order."""
    assert INFINITY_CLIENT_PYTHON.exists(), f"no {INFINITY_CLIENT_PYTHON}: run `make infinity`"
    base_url = f"{front_door.origin}/v1"
    done = subprocess.run(
        [str(INFINITY_CLIENT_PYTHON), "-c", CLIENT_SCRIPT, json.dumps([base_url, api_key, calls])],
        env={key: value for key, value in os.environ.items() if "proxy" not in key.lower()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (
        f"infinity-client failed (is it in tests/support/infinity/requirements.txt?):\n{done.stderr}"
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_infinity_client_rerank_reads_the_ranking_model_and_usage(front_door: FrontDoor) -> None:
    ranked, with_documents = infinity_client(
        front_door,
        [
            {"model": MODEL, "query": QUERY, "documents": DOCUMENTS},
            {"model": MODEL, "query": QUERY, "documents": DOCUMENTS, "top_n": 2, "return_documents": True},
        ],
    )

    assert ranked["type"] == "ReRankResult"
    assert ranked["model"] == MODEL
    assert ranked["id"]
    assert ranked["results"] == [[index, score, None] for index, score in RANKING]
    assert ranked["usage"] == {"prompt_tokens": TOKENS, "total_tokens": TOKENS}
    # Cohere's {"text": ...}, where Infinity itself answers the plain string: the client keeps
    # what it gets (docs/HTTP.md).
    assert with_documents["results"] == [
        [index, score, {"text": DOCUMENTS[index]}] for index, score in RANKING[:2]
    ]


def test_infinity_client_raw_scores_is_ignored(front_door: FrontDoor) -> None:
    """Infinity's `raw_scores` (the model's logits) is not read: the scores are the usual ones."""
    (raw,) = infinity_client(
        front_door, [{"model": MODEL, "query": QUERY, "documents": DOCUMENTS, "raw_scores": True}]
    )

    assert [(index, score) for index, score, _ in raw["results"]] == RANKING


def test_infinity_client_surfaces_errors_as_its_unexpected_status(front_door: FrontDoor) -> None:
    (invalid,) = infinity_client(
        front_door, [{"model": MODEL, "query": QUERY, "documents": DOCUMENTS, "top_n": 0}]
    )
    (unknown,) = infinity_client(
        front_door, [{"model": "no-such-model", "query": QUERY, "documents": DOCUMENTS}]
    )
    (refused,) = infinity_client(
        front_door, [{"model": MODEL, "query": QUERY, "documents": DOCUMENTS}], api_key=WRONG_KEY
    )

    assert invalid["status"] == 400
    assert invalid["body"]["message"] == front_door.grpc_error(top_n=0).details()
    assert unknown["status"] == 404
    assert unknown["body"]["message"] == front_door.grpc_error(model="no-such-model").details()
    assert refused["status"] == 401
    assert refused["body"]["message"] == front_door.grpc_error(api_key=WRONG_KEY).details()
