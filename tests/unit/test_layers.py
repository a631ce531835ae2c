"""The layer rules of docs/ARCHITECTURE.md, checked by reading the imports.

Every module of rerank_service/ is parsed with `ast`, and every import in it counts: at
module level, inside a function, under `if TYPE_CHECKING:`, absolute or relative. An
import inside a function still ties one module to another; it only hides the tie.
Checked: no import cycle among the service's modules, no layer importing what the
Folders table does not let it, the two front doors apart, and `testing/` on the
standard library alone.
"""

from __future__ import annotations

import ast
import itertools
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "rerank_service"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"

# The package's own module (`rerank_service/__init__.py`: the version): it imports
# nothing, and any layer may read it.
VERSION = ""

# docs/ARCHITECTURE.md's "Folders" table, its "may import" column: for each layer (a folder
# or a top module, named as a module path below rerank_service), the other layers it may
# import. An entry may also name one module of a layer (`core.domain`). A module belongs
# to the layer of the longest name that contains it; a layer may always import itself.
MAY_IMPORT: dict[str, frozenset[str]] = {
    VERSION: frozenset(),
    "cli": frozenset(
        {
            "workers",
            "server",
            "api",
            "pipeline",
            "routing",
            "core",
            "backends",
            "config",
            "observability",
        }
    ),
    "__main__": frozenset({"cli"}),
    "workers": frozenset({"config", "observability", "server"}),
    "server": frozenset({"api", "pipeline", "routing", "cache", "core", "config", "observability"}),
    "api": frozenset(),  # the package's docstring; each front door is a layer of its own
    "api.grpc": frozenset({"pipeline", "core", "config", "observability"}),
    "api.http": frozenset({"pipeline", "core", "config", "observability"}),
    "pipeline": frozenset({"core", "config", "observability", "redis_client"}),
    "routing": frozenset({"cache", "core", "config", "observability"}),
    "core": frozenset({"config", "observability"}),
    "cache": frozenset({"core", "config", "observability", "redis_client"}),
    "redis_client": frozenset(),
    "backends": frozenset(),  # the package's docstring; each backend is a layer of its own
    "backends.upstream": frozenset({"backends.upstream.client", "core", "config", "observability"}),
    "backends.upstream.client": frozenset(
        {"backends.upstream.errors", "core.domain", "config", "observability"}
    ),
    "backends.local": frozenset({"core", "config", "observability"}),
    "config": frozenset(),
    "observability": frozenset({"config.secret", "config.pem"}),
    "testing": frozenset(),
}

# Modules that may import more than their layer, as the table says of them.
ALSO_MAY_IMPORT: dict[str, frozenset[str]] = {
    "routing.build": frozenset({"backends.upstream", "backends.local"}),  # builds the backends
}

# The front doors never import each other. An exception would be listed here, as
# "module": "the other front door"; there is none: server.py, above both, assembles the
# process.
FRONT_DOOR_CROSSINGS: dict[str, str] = {}
FRONT_DOORS = ("api.grpc", "api.http")

# The third-party packages the table keeps out of layers. A name holds the layers below it.
PROTOBUF = frozenset({"google", "rerank", "grpc_health", "grpc_reflection", "grpc_status"})
HTTP_CLIENTS = frozenset({"httpx", "httpcore"})
TORCH = frozenset({"torch", "transformers", "onnxruntime", "huggingface_hub"})
NEVER_IMPORTS: dict[str, frozenset[str]] = {
    "core": PROTOBUF | HTTP_CLIENTS | {"aiohttp"},  # never protobuf or HTTP
    "cache": PROTOBUF | HTTP_CLIENTS | {"aiohttp"},  # scores by key: no wire format
    "api.grpc": HTTP_CLIENTS,  # a front door never talks to httpx
    "api.http": PROTOBUF | HTTP_CLIENTS,
    "backends": PROTOBUF,  # a backend never sees protobuf
}
TORCH_ONLY_IN = "backends.local"

# What testing/ may import besides the standard library: it ships to users and to the
# other languages' suites as a server with no dependencies.
TESTING_THIRD_PARTY: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Module:
    name: str  # below rerank_service: "api.grpc.server"; the package itself is VERSION
    path: Path

    @property
    def file(self) -> str:
        return str(self.path.relative_to(ROOT))


@dataclass(frozen=True, slots=True)
class Import:
    module: Module  # the importing module
    line: int
    target: str  # a module of the service (as Module.name), or a top-level package outside it
    outside: bool  # True: `target` is not rerank_service's

    def where(self) -> str:
        return f"{self.module.file}:{self.line}"


@cache
def modules() -> dict[str, Module]:
    """Every module of rerank_service/, by name."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT / PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        found[name] = Module(name, path)
    return found


def is_package(module: Module) -> bool:
    return module.path.name == "__init__.py"


def resolve(absolute: str) -> str | None:
    """The service's module name for a dotted import path, or None if it is not the service's."""
    if absolute == PACKAGE:
        return VERSION
    if absolute.startswith(PACKAGE + "."):
        return absolute.removeprefix(PACKAGE + ".")
    return None


def imports_of(module: Module) -> Iterator[Import]:
    """Every import in the module, wherever it is written."""
    tree = ast.parse(module.path.read_text(encoding="utf-8"), filename=str(module.path))
    known = modules()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield _import(module, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node)
            if base == "__future__":
                continue
            for alias in node.names:
                # `from package import name`: the submodule `name` if there is one, else the package.
                submodule = f"{base}.{alias.name}"
                resolved = resolve(submodule)
                target = submodule if resolved is not None and resolved in known else base
                yield _import(module, node.lineno, target)


def _from_base(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` reads from (`from . import x` included)."""
    if node.level == 0:
        assert node.module is not None
        return node.module
    package = [PACKAGE, *filter(None, module.name.split("."))]
    if not is_package(module):
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _import(module: Module, line: int, absolute: str) -> Import:
    resolved = resolve(absolute)
    if resolved is None:
        return Import(module, line, absolute.split(".")[0], outside=True)
    return Import(module, line, resolved, outside=False)


@cache
def all_imports() -> tuple[Import, ...]:
    return tuple(found for module in modules().values() for found in imports_of(module))


def service_imports() -> Iterator[Import]:
    return (found for found in all_imports() if not found.outside)


def contains(name: str, module: str) -> bool:
    """Whether the layer or module `name` is `module` or holds it."""
    return module == name or (name != VERSION and module.startswith(name + "."))


def layer_of(module: str) -> str | None:
    holders = [layer for layer in MAY_IMPORT if contains(layer, module)]
    return max(holders, key=len) if holders else None


def front_door_of(module: str) -> str | None:
    return next((door for door in FRONT_DOORS if contains(door, module)), None)


# --- the table itself ------------------------------------------------------------------------


def test_every_module_is_in_a_layer_of_the_table() -> None:
    homeless = [module.file for module in modules().values() if layer_of(module.name) is None]
    assert not homeless, (
        f"modules in no layer: {', '.join(homeless)}: add their layer to MAY_IMPORT here and to "
        "the Folders table of docs/ARCHITECTURE.md"
    )


def test_every_layer_and_entry_of_the_table_names_modules_that_exist() -> None:
    names = set(MAY_IMPORT) | {entry for entries in MAY_IMPORT.values() for entry in entries}
    names |= set(ALSO_MAY_IMPORT) | {entry for entries in ALSO_MAY_IMPORT.values() for entry in entries}
    names |= set(FRONT_DOOR_CROSSINGS) | set(FRONT_DOOR_CROSSINGS.values())
    names |= set(NEVER_IMPORTS) | {TORCH_ONLY_IN}
    stale = sorted(name for name in names if not any(contains(name, module) for module in modules()))
    assert not stale, f"the table names what no module is: {', '.join(stale)}"


def test_the_architecture_page_lists_every_layer() -> None:
    """Each layer has its row in the Folders table (the rules are here, their prose there)."""
    rows = set(re.findall(r"^\| `rerank_service/([\w/]+?)(?:/|\.py)`", ARCHITECTURE.read_text(), re.M))
    documented = {row.replace("/", ".") for row in rows}
    # The package's version and `python -m` need no row of their own.
    missing = sorted(set(MAY_IMPORT) - documented - {VERSION, "__main__", "backends", "api"})
    assert not missing, f"docs/ARCHITECTURE.md's Folders table has no row for: {', '.join(missing)}"


# --- the facts --------------------------------------------------------------------------------


def test_no_module_of_the_service_is_in_an_import_cycle() -> None:
    cycles = [describe_cycle(component) for component in import_cycles()]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_layer_imports_what_the_table_does_not_let_it() -> None:
    forbidden = [
        f"{found.where()}: {layer_of(found.module.name) or '?'} imports {PACKAGE}.{found.target}"
        for found in service_imports()
        if not may_import(found.module.name, found.target)
    ]
    assert not forbidden, "imports the Folders table of docs/ARCHITECTURE.md forbids:\n" + "\n".join(
        forbidden
    )


def test_the_grpc_and_http_front_doors_do_not_import_each_other() -> None:
    crossings = []
    for found in service_imports():
        source, target = front_door_of(found.module.name), front_door_of(found.target)
        crossing = source and target and source != target
        if crossing and FRONT_DOOR_CROSSINGS.get(found.module.name) != target:
            crossings.append(f"{found.where()}: {source}/ imports {PACKAGE}.{found.target}")
    assert not crossings, "one front door imports the other:\n" + "\n".join(crossings)


def test_no_layer_imports_a_library_the_table_keeps_out_of_it() -> None:
    forbidden = [
        f"{found.where()}: {layer_of(found.module.name) or '?'} imports {found.target}"
        for found in all_imports()
        if found.outside and found.target in kept_out_of(found.module.name)
    ]
    assert not forbidden, "libraries the Folders table of docs/ARCHITECTURE.md keeps out:\n" + "\n".join(
        forbidden
    )


def kept_out_of(module: str) -> frozenset[str]:
    kept_out = frozenset().union(*(never for name, never in NEVER_IMPORTS.items() if contains(name, module)))
    return kept_out if contains(TORCH_ONLY_IN, module) else kept_out | TORCH


def test_testing_imports_only_the_standard_library() -> None:
    testing = [found for found in all_imports() if contains("testing", found.module.name)]
    assert testing, "testing/ imports nothing? the test reads the wrong files"
    foreign = [
        f"{found.where()}: imports {found.target if found.outside else f'{PACKAGE}.{found.target}'}"
        for found in testing
        if not found.outside
        or (found.target not in sys.stdlib_module_names and found.target not in TESTING_THIRD_PARTY)
    ]
    assert not foreign, "testing/ must run on the standard library alone:\n" + "\n".join(foreign)


def may_import(source: str, target: str) -> bool:
    layer, target_layer = layer_of(source), layer_of(target)
    if layer is None or target_layer is None:
        return False  # test_every_module_is_in_a_layer_of_the_table says which
    if target_layer in (layer, VERSION):
        return True
    allowed = MAY_IMPORT[layer] | ALSO_MAY_IMPORT.get(source, frozenset())
    if FRONT_DOOR_CROSSINGS.get(source) is not None:
        allowed |= {FRONT_DOOR_CROSSINGS[source]}
    return any(contains(entry, target) for entry in allowed)


# --- cycles: strongly connected components (Tarjan) --------------------------------------------


def import_graph() -> dict[str, dict[str, int]]:
    """Each module's imports of the service: target -> the first line that imports it."""
    graph: dict[str, dict[str, int]] = {name: {} for name in modules()}
    for found in service_imports():
        graph[found.module.name].setdefault(found.target, found.line)
    return graph


def import_cycles() -> list[list[str]]:
    """The strongly connected components of more than one module, or of one that imports itself."""
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, {}):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, {}):
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def describe_cycle(component: list[str]) -> str:
    """One cycle through the component, each step with the file and line of its import."""
    graph = import_graph()
    members = set(component)
    start = component[0]
    # Breadth-first from the start, inside the component, until an import leads back to it.
    came_from: dict[str, str] = {}
    frontier = [start]
    while start not in came_from:
        assert frontier, f"{component} is no strongly connected component"
        following = []
        for node in frontier:
            for successor in graph[node]:
                if successor in members and successor not in came_from:
                    came_from[successor] = node
                    following.append(successor)
        frontier = following
    chain = []
    node = came_from[start]
    while node != start:
        chain.append(node)
        node = came_from[node]
    steps = [start, *reversed(chain), start]
    return (
        " -> ".join(
            f"{PACKAGE}.{source} ({modules()[source].file}:{graph[source][target]})"
            for source, target in itertools.pairwise(steps)
        )
        + f" -> {PACKAGE}.{start}"
    )


@pytest.mark.parametrize(
    ("source", "target", "allowed"),
    [
        ("api.grpc.edge", "core.engine", True),
        ("core.engine", "api.grpc.status", False),
        ("backends.upstream.client.transport", "core.domain", True),
        ("backends.upstream.client.transport", "core.engine", False),
        ("server", "api.http.server", True),
        ("api.grpc.server", "api.http.server", False),
        ("api.grpc.edge", "api.http.server", False),
        ("api.http.app", "api.grpc.status", False),
        ("observability.logging", "config.secret", True),
        ("observability.logging", "config.settings", False),
        ("cli", VERSION, True),
    ],
)
def test_the_rules_read_as_the_table_says(source: str, target: str, allowed: bool) -> None:
    assert may_import(source, target) is allowed
