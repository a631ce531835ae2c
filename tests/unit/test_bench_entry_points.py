"""Every benchmark's entry points import in the environment they run in, as on a fresh clone.

`make bench-*` runs `$(PY) -m bench.X` in .venv; some benchmarks also start processes in a
venv of their own (uvicorn + Starlette in .venv-litellm, the HTTP clients compared in
.venv-transports), and the bench module that starts them names them in its ENTRY_POINTS
(module -> venv). For each entry point and its venv, the import closure is read with `ast`:
the module and every module of this tree (bench/, rerank_service/, tests/) it imports, at
module level or in a function (it runs when that code runs), but not under
`if TYPE_CHECKING:` (never run) nor in a `try:` that catches ImportError (optional). Every
other top-level import must be the standard library or a distribution that a fresh `make`
installs there: one its requirement file names, or one such a distribution requires
unconditionally (read from its metadata, where .venv holds it; a venv whose packages are not
installed here is held to what its file names). Cheap: no venv is made; `make bench-http` and
`make bench-transports` import their entry points in the real venvs before measuring.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
MAKEFILE = ROOT / "Makefile"
FIRST_PARTY = ("bench", "rerank_service", "tests")  # this tree's packages: followed, not looked up
DOT_VENV = ".venv"

# Import names of distributions that .venv does not hold (so their metadata cannot be read
# here), as their wheels' RECORD lists them; and this project's two, whose editable installs
# record no files (an extra may name the project itself: `rerank-service[otel]`).
IMPORT_NAMES: dict[str, frozenset[str]] = {
    "rerank-service": frozenset({"rerank_service"}),
    "litellm": frozenset({"litellm"}),
    "uvicorn": frozenset({"uvicorn"}),
    "starlette": frozenset({"starlette"}),
    "httptools": frozenset({"httptools"}),
    "httpx-aiohttp": frozenset({"httpx_aiohttp"}),
    "rerank-service-client": frozenset(
        path.name for path in (ROOT / "clients/python/src").iterdir() if (path / "__init__.py").exists()
    ),
}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(lines: list[str]) -> set[str]:
    """Distribution names of requirement lines, with the extras asked for (`name[extra]`);
    pins and markers dropped; options, local paths and comments skipped."""
    names = set()
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if not text or text.startswith(("-", ".", "/")):
            continue
        found = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[\w,\s-]*\])?", text)
        assert found is not None, f"unreadable requirement: {line!r}"
        extras = "".join((found.group(2) or "").split())
        names.add(normalized(found.group(1)) + extras)
    return names


def installed_with(requirements: set[str]) -> frozenset[str]:
    """The distributions `requirements` install: those named, and what each requires
    unconditionally (or for an extra asked for), from the metadata of those .venv holds."""
    found: set[str] = set()
    pending = list(requirements)
    while pending:
        name, _, extras = pending.pop().partition("[")
        asked = {normalized(extra) for extra in extras.rstrip("]").split(",") if extra}
        if name in found and not asked:
            continue
        found.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement, _, marker = line.partition(";")
            extra = re.fullmatch(r"\s*extra\s*==\s*['\"]([\w.-]+)['\"]\s*", marker)
            if not marker.strip() or (extra is not None and normalized(extra.group(1)) in asked):
                pending += requirement_names([requirement])
    return frozenset(found)


@cache
def pyproject() -> dict[str, list[str]]:
    """pyproject's dependencies ("") and each extra's, by name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"": project["dependencies"], **project["optional-dependencies"]}


def requirements_file(path: str) -> list[str]:
    return (ROOT / path).read_text().splitlines()


@dataclass(frozen=True)
class Environment:
    venv: str
    distributions: frozenset[str]  # what its requirement files install
    built_by: str  # the Makefile prerequisite that installs it


@cache
def environments() -> dict[str, Environment]:
    deps = pyproject()
    every_extra = [line for lines in deps.values() for line in lines]
    return {
        item.venv: item
        for item in (
            # `make install-dev`: the service with every extra.
            Environment(DOT_VENV, installed_with(requirement_names(every_extra)), "install-dev"),
            # `make litellm`: its requirement file alone.
            Environment(
                ".venv-litellm",
                installed_with(requirement_names(requirements_file("bench/litellm/requirements.txt"))),
                "litellm",
            ),
            # bench-transports' venv: the service (pyproject's dependencies, no extra) and the
            # candidates' pins, in one install.
            Environment(
                ".venv-transports",
                installed_with(
                    requirement_names(deps[""])
                    | requirement_names(requirements_file("bench/transports/requirements.txt"))
                ),
                "$(TRANSPORTS_VENV)/.installed",
            ),
        )
    }


@cache
def import_names(distribution: str) -> frozenset[str]:
    """The top-level modules a distribution installs: its metadata when .venv holds it
    (top_level.txt, else RECORD), else IMPORT_NAMES."""
    names: set[str] = set()
    try:
        found = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        found = None
    if found is not None:
        top_level = found.read_text("top_level.txt")
        if top_level:
            names = {line.strip() for line in top_level.splitlines() if line.strip()}
        for path in found.files or []:
            first = path.parts[0]
            if first.endswith((".dist-info", ".data")) or first in ("..", "__pycache__"):
                continue
            if len(path.parts) > 1:
                names.add(first)
            elif first.endswith((".py", ".so", ".pyd")):
                names.add(first.split(".", 1)[0])
    names |= IMPORT_NAMES.get(distribution, frozenset())
    assert names, f"no import names known for {distribution}: add it to IMPORT_NAMES"
    return frozenset(names)


@cache
def provided(environment: Environment) -> dict[str, str]:
    """Top-level import name -> the distribution that provides it there."""
    return {name: dist for dist in sorted(environment.distributions) for name in import_names(dist)}


# --- the import closure ----------------------------------------------------------------


def module_path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _catches_import_error(node: ast.Try) -> bool:
    names = set()
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names |= {kind.id for kind in kinds if isinstance(kind, ast.Name)}
    return bool(names & {"ImportError", "ModuleNotFoundError"})


@cache
def imports(module: str, path: Path) -> tuple[str, ...]:
    """The modules `module` imports when its code runs (`from a import b`: a, and a.b)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> Iterator[str]:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children: list[ast.AST] = list(node.orelse)
        elif isinstance(node, ast.Try) and _catches_import_error(node):
            children = [*node.handlers, *node.orelse, *node.finalbody]
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
            return
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                parts = package.split(".")
                source = ".".join([*parts[: len(parts) - node.level + 1], *([source] if source else [])])
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names)
            return
        else:
            children = list(ast.iter_child_nodes(node))
        for child in children:
            yield from visit(child)

    return tuple(visit(ast.parse(path.read_text(), str(path))))


@dataclass(frozen=True)
class Closure:
    modules: dict[str, str]  # this tree's modules reached -> the one that imported it first
    third_party: dict[str, str]  # top-level names outside it -> the module that imports it first

    def chain(self, module: str) -> str:
        links = [module]
        while self.modules.get(links[-1]):
            links.append(self.modules[links[-1]])
        return " <- ".join(links)


@cache
def closure(entry: str) -> Closure:
    modules: dict[str, str] = {}
    third_party: dict[str, str] = {}
    pending = [(entry, "")]
    while pending:
        module, by = pending.pop()
        top = module.split(".")[0]
        if top not in FIRST_PARTY:
            if top not in sys.stdlib_module_names:
                third_party.setdefault(top, by)
            continue
        # Importing a.b.c runs a and a.b first.
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            path = module_path(name)
            if path is None or name in modules:
                continue
            modules[name] = by
            pending += [(found, name) for found in imports(name, path)]
    return Closure(modules, third_party)


# --- the entry points ------------------------------------------------------------------


def makefile_variables(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_]+) :?= (\S+)$", text, flags=re.MULTILINE))


@dataclass(frozen=True)
class Target:
    name: str
    prerequisites: tuple[str, ...]
    entry_points: tuple[tuple[str, str], ...]  # (module, venv) its recipe runs


def bench_targets() -> list[Target]:
    """The Makefile's bench-* targets, and each `PYTHON -m bench.X` of their recipes."""
    text = MAKEFILE.read_text()
    variables = makefile_variables(text)
    targets = []
    for found in re.finditer(r"^(bench-[\w-]+):(.*)\n((?:\t.*\n)*)", text, flags=re.MULTILINE):
        runs = []
        for python, module in re.findall(r"(\S+) -m (bench\.\w+)", found.group(3)):
            if python == "$(PY)":
                venv = DOT_VENV
            else:
                variable = re.fullmatch(r"\$\((\w+)\)/bin/python", python)
                assert variable is not None, f"{found.group(1)}: which venv is {python}?"
                venv = variables[variable.group(1)]
            runs.append((module, venv))
        targets.append(Target(found.group(1), tuple(found.group(2).split()), tuple(runs)))
    return targets


def bench_modules() -> list[str]:
    return sorted(f"bench.{path.stem}" for path in BENCH.glob("*.py") if path.stem != "__init__")


def declares(module: str) -> bool:
    path = module_path(module)
    assert path is not None
    return any(
        isinstance(node, ast.Assign | ast.AnnAssign)
        and any(
            isinstance(target, ast.Name) and target.id == "ENTRY_POINTS"
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
        for node in ast.parse(path.read_text()).body
    )


@cache
def declared(module: str) -> dict[str, str]:
    """A bench module's ENTRY_POINTS (module -> venv); {} when it names none."""
    if not declares(module):
        return {}
    entry_points = importlib.import_module(module).ENTRY_POINTS
    assert isinstance(entry_points, dict)
    return {str(name): str(venv) for name, venv in entry_points.items()}


def entry_points() -> list[tuple[str, str]]:
    """(module, venv): each Makefile run, each declared one, and every other bench module in
    .venv (each is `python -m bench.X` there, as its docstring says)."""
    found = {run for target in bench_targets() for run in target.entry_points}
    elsewhere = set()
    for module in bench_modules():
        for name, venv in declared(module).items():
            found.add((name, venv))
            if venv != DOT_VENV:
                elsewhere.add(name)
    found |= {(module, DOT_VENV) for module in bench_modules() if module not in elsewhere}
    return sorted(found)


# --- the checks ------------------------------------------------------------------------


@pytest.mark.parametrize(("module", "venv"), entry_points(), ids=lambda value: str(value))
def test_an_entry_point_imports_only_what_its_venv_installs(module: str, venv: str) -> None:
    environment = environments().get(venv)
    assert environment is not None, f"{module} runs in {venv}: describe that venv in environments()"
    assert module_path(module) is not None, f"{module} ({venv}) is no module of this tree"
    found = closure(module)
    available = provided(environment)
    missing = {name: found.chain(by) for name, by in found.third_party.items() if name not in available}
    assert missing == {}, (
        f"{module} imports what {venv} does not install (name: imported by <- ...): {missing}"
    )


def test_the_closure_follows_this_trees_imports_and_skips_what_never_runs() -> None:
    # bench.http_starlette reaches httpx only through bench.http_minimal; the transport reaches
    # httpx only through the modules it imports (proxies.py imports httpx's private module).
    found = closure("bench.http_starlette")
    assert found.third_party["httpx"] == "bench.http_minimal"
    assert "bench.http_minimal" in found.modules
    assert "grpc" not in found.third_party
    transport = closure("rerank_service.backends.upstream.client.transport")
    assert {"aiohttp", "httpx", "orjson", "yarl"} <= set(transport.third_party)
    assert "rerank_service.backends.upstream.client.proxies" in transport.modules


def test_a_bench_that_runs_modules_in_another_venv_declares_each() -> None:
    """A bench module naming a venv besides .venv and a bench module to run (a string
    `bench.X`) says in its ENTRY_POINTS where each runs: else the check above would take
    .venv for it."""
    undeclared = {}
    for module in bench_modules():
        path = module_path(module)
        assert path is not None
        source = path.read_text()
        if not re.search(r"\.venv-[\w-]+", source):
            continue
        started = {
            node.value
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"bench\.\w+", node.value)
            and module_path(node.value) is not None
        }
        if started - set(declared(module)):
            undeclared[module] = sorted(started - set(declared(module)))
    assert undeclared == {}


def test_each_bench_target_installs_every_venv_its_entry_points_run_in() -> None:
    missing = {}
    for target in bench_targets():
        venvs = set()
        for module, venv in target.entry_points:
            venvs.add(venv)
            for reached in closure(module).modules:
                if reached.startswith("bench.") and reached.count(".") == 1:
                    venvs |= set(declared(reached).values())
        needed = {environments()[venv].built_by for venv in venvs}
        if needed - set(target.prerequisites):
            missing[target.name] = sorted(needed - set(target.prerequisites))
    assert missing == {}, "bench targets lack the install step of a venv they run in"


def test_every_bench_target_runs_an_entry_point() -> None:
    # A recipe this test cannot read (another way of starting Python) would escape it.
    targets = {target.name: target.entry_points for target in bench_targets()}
    assert "bench-http" in targets
    assert [name for name, runs in targets.items() if not runs] == []
