"""The config file as `serve --workers N` serves it: one copy, loaded by the supervisor.

Were each worker to read the file itself, a worker restarted after the file was edited
(and no SIGHUP sent yet) would serve the new file beside siblings serving the old one,
without the checks a reload makes (a truncated file would start the demo model there).
The supervisor reads the file instead: at start, and on each SIGHUP once the new text
passes the checks a reload makes, into its copy (`SNAPSHOT_ARG`, named in messages as the
file), and loads it. The files the copy names for keys (callers' `key_file`, deployments'
`api_key_file`, `api_keys_file`) are read then too, by the supervisor alone: workers,
started or restarted, and their reloads are handed the settings so loaded (workers.py),
and never read a file that a mounted Secret may have changed since.

A reload keeps the caller keys as started, as a worker's does: every later copy is
loaded, checked and compared with the first copy's keys put back (`api_keys`), which
every worker, a restarted one too, serves whatever the copy says.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rerank_service.config.deployments import as_reloaded
from rerank_service.config.secret import Secret
from rerank_service.config.settings import ConfigError, Settings
from rerank_service.config.sources import CONFIG_ENV, SNAPSHOT_ARG, load_settings


class ConfigSnapshot:
    """The copy in `directory` (the supervisor's own) of the file `args` or the environment
    name; `has_file` is False when they name none (then there is nothing to copy)."""

    def __init__(self, args: Mapping[str, Any], directory: str) -> None:
        named = args.get("config") or os.environ.get(CONFIG_ENV, "").strip()
        self._file = Path(named) if named else None
        self._args = {key: value for key, value in args.items() if key != SNAPSHOT_ARG}
        self.path = Path(directory) / "config.yaml"
        self._served: Settings | None = None
        # The copy's settings as loaded (its own caller keys): what a worker's reload compares
        # with the settings it serves, and names each changed one that a reload leaves as started.
        self.loaded: Settings | None = None

    @property
    def has_file(self) -> bool:
        return self._file is not None

    @property
    def api_keys(self) -> tuple[Secret, ...]:
        """The caller keys of the first copy: those the workers serve, whatever a later copy says."""
        assert self._served is not None, "not copied yet"
        return self._served.api_keys

    def copy(self, check: Callable[[Settings], None] | None = None) -> Settings:
        """Copy the file for the workers and load it: the first time, as they serve it from
        the start; later (a SIGHUP), only if a reload from what the copy held may take it
        and `check` passes (what the workers' reload builds: a file every worker would
        refuse must not become the copy a restarted worker starts from); the settings
        returned and checked then have the caller keys as started. A ConfigError
        says why not, the copy left as it was."""
        assert self._file is not None, "no config file to copy"
        try:
            data = self._file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"config {self._file}: cannot read it ({exc.strerror or exc})") from None
        candidate = self.path.with_name(self.path.name + ".new")
        with self._copying(candidate):
            candidate.write_bytes(data)
        try:
            loaded = settings = load_settings({**self._args, SNAPSHOT_ARG: str(candidate)})
            if self._served is not None:
                settings = as_reloaded(loaded, self._served)
            if check is not None:
                check(settings)
        except BaseException:
            candidate.unlink(missing_ok=True)
            raise
        with self._copying(candidate):
            os.replace(candidate, self.path)  # whole, at once: never half of it
        self._served, self.loaded = settings, loaded
        return settings

    @contextlib.contextmanager
    def _copying(self, candidate: Path) -> Iterator[None]:
        """A write of the copy that fails (a full or read-only disk) is a ConfigError, as a
        refused file is: the workers keep the copy they have, and the supervisor goes on."""
        try:
            yield
        except OSError as exc:
            with contextlib.suppress(OSError):  # whatever is in its way, the refusal stands
                candidate.unlink(missing_ok=True)
            why = exc.strerror or str(exc)
            raise ConfigError(f"config {self._file}: cannot copy it for the workers ({why})") from None
