"""`serve --workers N` cleans up after a supervisor killed with SIGKILL: at start it removes
the metrics directories whose supervisor is gone, and nothing else."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rerank_service.workers import make_metrics_directory, remove_stale_metrics_directories

# A process that makes a metrics directory in ROOT as a supervisor does, prints it, and
# holds it until its stdin closes.
SUPERVISOR = (
    "import sys; from rerank_service.workers import make_metrics_directory as make; "
    "print(make(sys.argv[1])[0], flush=True); sys.stdin.read()"
)


@pytest.fixture
def live_supervisor(tmp_path: Path) -> Iterator[Path]:
    """The directory of a supervisor that is running."""
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    directory = Path(process.stdout.readline().strip())
    yield directory
    process.communicate("")


def killed_supervisor(root: Path) -> Path:
    """The directory a supervisor left when it was killed (SIGKILL: no clean-up ran)."""
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    directory = Path(process.stdout.readline().strip())
    process.kill()
    process.wait()
    (directory / "counter_1234.db").write_bytes(b"metrics")  # what its workers wrote
    return directory


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_directory_of_a_killed_supervisor_is_removed_and_a_live_ones_kept(
    tmp_path: Path, live_supervisor: Path
) -> None:
    killed = killed_supervisor(tmp_path)

    removed = remove_stale_metrics_directories(str(tmp_path))

    assert removed == [str(killed)]
    assert not killed.exists()
    assert live_supervisor.is_dir()


def test_a_directory_named_after_a_dead_pid_or_after_this_process_is_stale(tmp_path: Path) -> None:
    # Unlocked, named after a pid that is gone, or after this very process (the pid a
    # container's supervisor gets again after a restart, with /tmp kept).
    dead = tmp_path / f"rerank-metrics-{dead_pid()}-abc123"
    mine = tmp_path / f"rerank-metrics-{os.getpid()}-def456"
    for directory in (dead, mine):
        directory.mkdir()

    removed = remove_stale_metrics_directories(str(tmp_path))

    assert sorted(removed) == sorted([str(dead), str(mine)])
    assert list(tmp_path.iterdir()) == []


def test_this_processs_own_live_directory_is_kept(tmp_path: Path) -> None:
    directory, lock = make_metrics_directory(str(tmp_path))
    try:
        assert Path(directory).name.startswith(f"rerank-metrics-{os.getpid()}-")
        assert remove_stale_metrics_directories(str(tmp_path)) == []
        assert Path(directory).is_dir()
    finally:
        os.close(lock)


def test_only_our_own_directories_by_our_naming_are_touched(tmp_path: Path) -> None:
    pid = dead_pid()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("not ours to remove")
    others = tmp_path / f"rerank-metrics-{pid}-other1"  # another user's
    others.mkdir()
    os.chown(others, 4242, 4242)
    link = tmp_path / f"rerank-metrics-{pid}-link12"  # a symlink named like ours
    link.symlink_to(elsewhere)
    older = tmp_path / "rerank-metrics-k2x9v0aa"  # an older version's name: no pid in it
    older.mkdir()
    unrelated = tmp_path / f"something-{pid}-else00"
    unrelated.mkdir()

    assert remove_stale_metrics_directories(str(tmp_path)) == []
    assert all(path.exists() for path in (others, link, older, unrelated))
    assert (elsewhere / "keep").read_text() == "not ours to remove"


def test_without_file_locks_the_pid_in_the_name_decides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # what workers.py calls
    dead = tmp_path / f"rerank-metrics-{dead_pid()}-abc123"
    mine = tmp_path / f"rerank-metrics-{os.getpid()}-def456"  # a previous life of this pid
    live = tmp_path / f"rerank-metrics-{os.getppid()}-ghi789"  # a running process's
    for directory in (dead, mine, live):
        directory.mkdir()

    removed = remove_stale_metrics_directories(str(tmp_path))

    assert sorted(removed) == sorted([str(dead), str(mine)])
    assert live.is_dir()
