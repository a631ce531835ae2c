"""Server reflection that keeps the proto comments, so `grpcurl describe` shows them.

Generated Python code carries descriptors without source info (comments), and the
stock reflection service serialises what the descriptor pool holds. `make generate`
also writes the contract's FileDescriptorSet *with* source info next to the stubs;
this module serves those full file descriptors and delegates everything else.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

DESCRIPTOR_SET = "rerank_descriptor_set.binpb"


def load_commented_files() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """The contract's file descriptors with comments, by file name."""
    data = resources.files("rerank.v1").joinpath(DESCRIPTOR_SET).read_bytes()
    file_set = descriptor_pb2.FileDescriptorSet.FromString(data)
    return {file.name: file for file in file_set.file}


class _CommentedFile:
    """Looks like a FileDescriptor to the reflection service; copies out the full proto."""

    def __init__(self, descriptor: Any, full: descriptor_pb2.FileDescriptorProto) -> None:
        self._descriptor = descriptor
        self._full = full

    @property
    def name(self) -> str:
        return str(self._descriptor.name)

    @property
    def dependencies(self) -> Any:
        return self._descriptor.dependencies

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        proto.CopyFrom(self._full)


class _CommentedPool:
    """The default descriptor pool, answering with commented files where it has them."""

    def __init__(self, pool: descriptor_pool.DescriptorPool, files: dict[str, Any]) -> None:
        self._pool = pool
        self._files = files

    def _wrap(self, descriptor: Any) -> Any:
        full = self._files.get(descriptor.name)
        return descriptor if full is None else _CommentedFile(descriptor, full)

    def FindFileByName(self, name: str) -> Any:
        return self._wrap(self._pool.FindFileByName(name))

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return self._wrap(self._pool.FindFileContainingSymbol(symbol))
        except KeyError:
            # protobuf's pool finds no method by its full name (`grpcurl describe
            # rerank.v1.RerankService.Rerank` asks for one): its service's file holds it.
            service, _, method = symbol.rpartition(".")
            try:
                found = self._pool.FindServiceByName(service)
            except KeyError:
                raise KeyError(symbol) from None
            if method not in found.methods_by_name:
                raise
            return self._wrap(found.file)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._pool, attribute)


def add_reflection(server: Any, service_names: Iterable[str]) -> None:
    """Add the reflection service for `service_names` (and itself) to `server`: a grpc.aio
    server, or what stands in for one (side_calls.py)."""
    pool = _CommentedPool(descriptor_pool.Default(), load_commented_files())
    names = (*service_names, reflection.SERVICE_NAME)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(names, pool=pool), server
    )
