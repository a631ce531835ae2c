"""The config file as `serve --workers N` serves it: one copy, which every worker reads.

Were each worker to read the file itself, a worker restarted after the file was edited
(and no SIGHUP sent yet) would serve the new file beside siblings serving the old one,
without the checks a reload makes (a truncated file would start the demo model there).
The supervisor reads the file instead: at start, and on each SIGHUP once the new text
passes the checks a reload makes; workers, started or restarted, and their reloads read
only its copy (`SNAPSHOT_ARG`), named in messages as the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rerank_service.config.deployments import authentication_refusal, reload_refusal
from rerank_service.config.settings import ConfigError, Settings
from rerank_service.config.sources import CONFIG_ENV, SNAPSHOT_ARG, load_settings


class ConfigSnapshot:
    """The copy in `directory` (the supervisor's own) of the file `args` or the environment
    name; `taken` is False when they name none (then there is nothing to copy)."""

    def __init__(self, args: Mapping[str, Any], directory: str) -> None:
        named = args.get("config") or os.environ.get(CONFIG_ENV, "").strip()
        self._file = Path(named) if named else None
        self._args = {key: value for key, value in args.items() if key != SNAPSHOT_ARG}
        self.path = Path(directory) / "config.yaml"
        self._started: Settings | None = None
        self._served: Settings | None = None

    @property
    def taken(self) -> bool:
        return self._file is not None

    def worker_args(self) -> dict[str, Any]:
        """The arguments a worker loads its settings from: the copy in place of the file."""
        if self._file is None:
            return dict(self._args)
        return {**self._args, SNAPSHOT_ARG: str(self.path)}

    def take(self) -> Settings:
        """Copy the file now, as the workers will serve it from the start; a ConfigError when
        it does not load."""
        settings = self._copied(check=False)
        self._started = self._served = settings
        return settings

    def renew(self) -> Settings:
        """Copy the file again for a reload (SIGHUP), if it loads and passes the checks a
        reload makes; a ConfigError saying why not, the copy left as it was."""
        return self._copied(check=True)

    def _copied(self, check: bool) -> Settings:
        assert self._file is not None, "no config file to copy"
        try:
            data = self._file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"config {self._file}: cannot read it ({exc.strerror or exc})") from None
        candidate = self.path.with_name(self.path.name + ".new")
        candidate.write_bytes(data)
        try:
            settings = load_settings({**self._args, SNAPSHOT_ARG: str(candidate)})
            if check:
                assert self._started is not None, "take() comes first"
                assert self._served is not None
                refusal = reload_refusal(self._served, settings) or authentication_refusal(
                    self._started, settings
                )
                if refusal is not None:
                    raise ConfigError(refusal)
        except BaseException:
            candidate.unlink(missing_ok=True)
            raise
        os.replace(candidate, self.path)  # whole, at once: a worker never reads half of it
        self._served = settings
        return settings
