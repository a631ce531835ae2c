"""A local deployment's configuration: models run in this process, and how.

What a `LocalBackend` is built from, and nothing else: a reload compares two of these, so
a loaded model is kept unless something it is run with changed. The declarations stay in
settings.py, once; `from_settings` reads the checked values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rerank_service.config.settings import Device, Dtype, LocalEngine, Quantize, Settings


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Micro-batching: pairs of concurrent calls scored in one forward pass."""

    max_size: int
    max_tokens: int
    wait_ms: float
    merge: bool  # --micro-batching: merge concurrent calls' pairs


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What runs the forward pass (backends/local/forward.py, onnx_engine.py)."""

    engine: LocalEngine
    quantize: Quantize  # int8: onnx only
    threads: int  # 0: the runtime's default
    onnx_cache: Path | None
    device: Device
    dtype: Dtype


@dataclasses.dataclass(frozen=True)
class LocalDeploymentConfig:
    """Models run in-process: (name callers send, source) pairs."""

    models: tuple[tuple[str, str], ...]
    engine: EngineConfig
    batch: BatchConfig
    max_documents: int
    max_query_tokens: int

    kind = "local"

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalDeploymentConfig:
        return cls(
            models=settings.local_models,
            engine=EngineConfig(
                engine=settings.local_engine,
                quantize=settings.local_quantize,
                threads=settings.local_threads,
                onnx_cache=settings.local_onnx_cache,
                device=settings.device,
                dtype=settings.dtype,
            ),
            batch=BatchConfig(
                max_size=settings.max_batch_size,
                max_tokens=settings.max_batch_tokens,
                wait_ms=settings.batch_wait_ms,
                merge=settings.micro_batching,
            ),
            max_documents=settings.max_documents,
            max_query_tokens=settings.max_query_tokens,
        )

    def serving(self, models: tuple[tuple[str, str], ...]) -> LocalDeploymentConfig:
        """This deployment, serving `models` instead."""
        return dataclasses.replace(self, models=models)
