"""docs/CONFIGURATION.md, generated from the declarations in settings.py.

    python -m rerank_service.config.reference > docs/CONFIGURATION.md   # or: make docs

tests/unit/test_config_reference.py fails when the page and the declarations differ.
"""

from __future__ import annotations

import sys

from rerank_service.config.settings import ConfigError, Option, options
from rerank_service.config.sources import CONFIG_ENV, CONFIG_FLAG, load_settings

# A file that loads: test_config_reference.py checks it.
EXAMPLE = """\
# rerank.yaml, for: rerank-service serve --config rerank.yaml
backend: upstream
upstream_url: https://dashscope-intl.aliyuncs.com
upstream_models: [qwen3-rerank, gte-rerank-v2]   # or "qwen3-rerank,gte-rerank-v2"
upstream_timeout: 10
upstream_proxy: http://proxy.internal:3128
log_format: json
metrics_port: 9100
local_models:                                    # or "all-minilm-l6-v2=bundled"
  all-minilm-l6-v2: bundled
"""

# The file-only `models:` section, in short; docs/ROUTING.md has every key.
ROUTES_EXAMPLE = """\
models:
  - name: qwen3-rerank                           # the model name callers send
    deployments:
      - format: dashscope
        url: https://dashscope-intl.aliyuncs.com
        api_key_env: DASHSCOPE_API_KEY
      - format: local                            # called when the hosted API cannot answer
        source: bundled
        priority: 1
"""

# The file-only `callers:` section, in short; docs/TENANTS.md has every key.
CALLERS_EXAMPLE = """\
callers:
  - name: search                                 # in logs, metrics and usage
    credentials:
      - key_env: SEARCH_API_KEY
    models: [qwen3-rerank]                       # default: every model ("*")
    limits: {requests_per_minute: 600, tokens_per_minute: 2000000}
"""


def render() -> str:
    plain = [option for option in options() if option.keys is None]
    secrets = [option for option in options() if option.keys is not None]
    lines = [
        "# Configuration",
        "",
        "Every setting of `rerank-service serve`: its flag, environment variable and config-file",
        "key, the values it accepts, its default and what it does. This page is generated from",
        "the declarations in [settings.py](../rerank_service/config/settings.py) by `make docs`",
        "(`python -m rerank_service.config.reference > docs/CONFIGURATION.md`): edit those, not",
        "this page.",
        "",
        "## Contents",
        "",
        "- [Sources and precedence](#sources-and-precedence)",
        "- [The config file](#the-config-file)",
        "- [Settings](#settings)",
        "- [Secrets](#secrets)",
        "",
        "## Sources and precedence",
        "",
        "A setting's value comes from the first of these that sets it:",
        "",
        "1. a command-line flag: `--upstream-timeout 10`;",
        "2. an environment variable: `RERANK_UPSTREAM_TIMEOUT=10` (an empty variable counts as unset);",
        f"3. the YAML file named by `{CONFIG_FLAG} FILE` or `{CONFIG_ENV}`: `upstream_timeout: 10`;",
        "4. the default.",
        "",
        "A value that is wrong, from any source, stops start-up with exit code 2 and one line",
        "naming the setting and where the value came from:",
        "",
        "```text",
        f"rerank-service: configuration error: {_error_for({'RERANK_UPSTREAM_TIMEOUT': '-3'})}",
        "```",
        "",
        "## The config file",
        "",
        "A mapping of setting names (the flag without its dashes, in snake_case) to values.",
        "Values are YAML's own types; a setting whose flag takes a comma-separated list also",
        "takes a YAML list (or mapping, for `local_models`), and the flag's string form works",
        "too. An unknown key is an error, as is a key's value of the wrong type or out of",
        "bounds. Relative paths are relative to the directory the service starts in.",
        "",
        "```yaml",
        *EXAMPLE.splitlines(),
        "```",
        "",
        "One key is read only from the file: `models`, the routes. Each is a model name",
        "callers send, served by one or more deployments (hosted APIs, self-hosted servers,",
        "models run in the service), each with its own format, URL, key, priority, weight",
        "and value of any `upstream_*` setting, which it names without the prefix",
        "(`timeout` for `upstream_timeout`). Without `models`, the settings below describe",
        "one deployment that serves every model they name, and with it `backend`,",
        "`upstream_url`, `upstream_dialect`, `upstream_models` and `local_models` are not",
        "used. Every key, how calls are balanced and fall back, and reloading the file with",
        "SIGHUP: [ROUTING.md](ROUTING.md#the-models-section). `rerank-service check-config",
        "FILE` checks a file without serving.",
        "",
        "```yaml",
        *ROUTES_EXAMPLE.splitlines(),
        "```",
        "",
        "The file alone also holds `callers`: the service's tenants, each a name, its",
        "credentials (a key named by `key_env` or `key_file`, the key's `key_sha256`, or an",
        "mTLS client certificate's `tls_identity`), the `models` it may call and its `limits`",
        "(requests, documents and tokens per minute, calls in flight). A key is never written",
        "in the file. Every key, what each limit counts and how to read each caller's usage:",
        "[TENANTS.md](TENANTS.md). SIGHUP reloads it with the routes.",
        "",
        "```yaml",
        *CALLERS_EXAMPLE.splitlines(),
        "```",
        "",
        "One more key is read only from the file: `allow_backend_change` (default `false`).",
        "A reload (SIGHUP) that would change the kind of backend that serves (upstream,",
        "local) or drop the `models` section is refused unless the new file sets it to",
        "`true`, so a file truncated or caught mid-write never replaces the routes. An empty",
        "file (blank, or comments only) is refused at start, by `check-config` and at reload:",
        "[ROUTING.md](ROUTING.md#reloading-with-sighup).",
        "",
        "## Settings",
        "",
        "| flag | environment | file key | accepts | default | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| `{CONFIG_FLAG}` | `{CONFIG_ENV}` | | a YAML file | `unset` | the config file above |",
        *(_row(option) for option in plain),
        "",
        "## Secrets",
        "",
        "Keys are read only from environment variables and files: never from a flag, which",
        "`ps` shows, and never from the config file itself, which may name a key file instead.",
        "Each secret comes from the first source that is set: its file flag, then its variables",
        "in the order listed, then its key-file entry in the config file. A variable ending in",
        "`_FILE` names a file: caller keys one a line (`#` starts a comment), the upstream key",
        "the whole file. A source that is set but holds no key is an error, so a mistake never",
        "switches authentication off. Keys never appear in logs, `repr()` or error messages.",
        "",
        "| file flag | variables | config-file key | meaning |",
        "| --- | --- | --- | --- |",
        *(_secret_row(option) for option in secrets),
        "",
    ]
    return "\n".join(lines)


def _row(option: Option) -> str:
    cells = [
        f"`{option.flag}`",
        f"`{option.env}`",
        f"`{option.name}`",
        option.expect,
        f"`{option.shown_default}`",
        option.help,
    ]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _secret_row(option: Option) -> str:
    assert option.keys is not None
    variables = ", ".join(f"`{name}`" for name in option.keys.env)
    return f"| `{option.keys.file_flag}` | {variables} | `{option.keys.file_key}` | {option.help} |"


def _error_for(env: dict[str, str]) -> str:
    try:
        load_settings({}, env)
    except ConfigError as exc:
        return str(exc)
    raise AssertionError(f"{env} should be refused")


if __name__ == "__main__":
    sys.stdout.write(render())
