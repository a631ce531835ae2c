"""Whether a file may be trusted: a key others may read, a cache others may write.

Two questions, asked of files the service reads but did not choose the contents of:

- a key file (a TLS key, a file of API keys): may anyone but its owner read it, and is
  it reached through a symlink that leads out of its own directory? Either is warned
  about, in one line naming the file (never its content), and the file is still used:
  a mounted container secret is often 0644, and refusing would stop a service that
  worked;
- a cached artefact the service loads and runs (an ONNX graph): is it a symlink, may
  anyone but its owner change it, or does another user own it? Any of these and it
  is not loaded (the caller decides what to do instead, `untrusted` says why).

The warnings go through structlog. Key files are read while the settings load, before
logging is configured (the log needs the keys to mask them): a warning found then is
held, and written by `flush_held_warnings`, which `serve` calls once it has configured
logging (a process that never does, a test or a library user, keeps at most _HELD).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

_HELD = 64
_held: list[tuple[str, dict[str, Any]]] = []


def warn_if_key_exposed(path: Path, what: str) -> None:
    """One warning line if `path`, a file holding a secret, is readable by its group or
    others, or is a symlink that leads out of its own directory. `what` names it
    (`tls key`, `key file`): the event is `<what> readable by others` or `<what> behind a
    symlink`."""
    fields: dict[str, Any] = {"path": str(path)}
    fixes: list[str] = []
    try:
        info = path.stat()  # the file itself, through any link
    except OSError:
        return  # unreadable: the reader says so, in its own words
    mode = info.st_mode
    exposed = bool(mode & (stat.S_IRWXG | stat.S_IRWXO)) and not _read_through_its_group(info)
    if exposed:
        fields["mode"] = oct(stat.S_IMODE(mode))
        fixes.append(f"chmod 600 {path}")
    target = _link_out_of_its_directory(path)
    if target is not None:
        fields["target"] = str(target)
        fixes.append("name the file itself, not a link to it")
    if fixes:
        event = f"{what} readable by others" if exposed else f"{what} behind a symlink"
        _warn(event, **fields, fix="; ".join(fixes))


def _read_through_its_group(info: os.stat_result) -> bool:
    """Whether this process reads the file through its group alone: someone else's, mode
    0440 to a group the process is in. A Kubernetes secret volume with an fsGroup is so
    (root's, the pod's group, whatever its defaultMode): 0400 would lock the process out,
    so its group's read is no exposure that `chmod` could fix."""
    return (
        stat.S_IMODE(info.st_mode) & 0o077 == 0o040
        and info.st_uid != os.getuid()
        and (info.st_gid == os.getgid() or info.st_gid in os.getgroups())
    )


def _link_out_of_its_directory(path: Path) -> Path | None:
    """Where `path` leads if it is a symlink to a file outside its own directory, else None.

    A link that stays inside its directory (a Kubernetes secret volume: `key -> ..data/key`,
    `..data -> ..2024_...`) can only be changed by whoever may write that directory, who
    could replace the file itself anyway; a link out of it hands the key to whoever
    controls the other place.
    """
    if not path.is_symlink():
        return None
    target = path.resolve()
    return None if target.is_relative_to(path.parent.resolve()) else target


def untrusted(path: Path) -> str | None:
    """Why `path` (a file or directory the service would load code or data from) must not
    be trusted, or None: a symlink, writable by its group or others, or owned by another
    user than this process's (or root). The link itself is judged, never followed."""
    try:
        info = path.lstat()
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISLNK(info.st_mode):
        return "is a symlink"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by its group or others (mode {oct(stat.S_IMODE(info.st_mode))})"
    if info.st_uid not in (os.getuid(), 0):
        return f"is owned by uid {info.st_uid}, not this user (uid {os.getuid()})"
    return None


@contextlib.contextmanager
def warnings_said() -> Iterator[None]:
    """Files read again that were just read (and warned about): nothing is said twice (the
    `--workers` supervisor's first copy of the file, read once already to start)."""
    global _muted
    _muted = True
    try:
        yield
    finally:
        _muted = False


_muted = False


def _warn(event: str, **fields: Any) -> None:
    if _muted:
        return
    if structlog.is_configured():
        structlog.get_logger(logger_name="rerank_service.config").warning(event, **fields)
    elif len(_held) < _HELD:
        _held.append((event, fields))


def flush_held_warnings() -> None:
    """Write the warnings found before logging was configured; call it once it is."""
    if not structlog.is_configured():
        return
    while _held:
        event, fields = _held.pop(0)
        _warn(event, **fields)
