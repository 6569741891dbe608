"""The package's layout rules, checked on the source (with `ast`) and on a fresh interpreter.

- Production code never imports `vpn_packet.testutil` (not even inside a function).
- No import cycle among `vpn_packet` modules through the imports that run when a module is imported: those at
  module level, in classes and in `try`/`if` blocks there; not those under `if TYPE_CHECKING:` nor inside
  functions (they run later, when everything is loaded).
- Building the command's parser (`vpn_packet.cli.build_parser()`) loads no node, receiver or dispatcher: the
  commands import what they run inside their handlers, so `vpn-packet --help` stays light.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import vpn_packet

PACKAGE = "vpn_packet"
ROOT = Path(vpn_packet.__file__).resolve().parent
TESTUTIL = f"{PACKAGE}.testutil"


# --- reading the source -----------------------------------------------------------------------------------


def module_name(path: Path, root: Path = ROOT, package: str = PACKAGE) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def source_modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every Python module of the package by dotted name (packages by their `__init__`)."""
    return {module_name(path, root, package): path for path in sorted(root.rglob("*.py"))}


@dataclass(frozen=True)
class Import:
    """One imported name: `module` (absolute, dotted), `name` for `from module import name`, else None."""

    module: str
    name: str | None
    line: int
    at_import_time: bool  # False inside a function or under `if TYPE_CHECKING:`


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute module of an `ImportFrom` (relative imports resolved against `importer`)."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_of(path: Path, importer: str) -> Iterator[Import]:
    """Every import statement of a module, with whether it runs when the module is imported."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"

    def walk(node: ast.AST, at_import_time: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(alias.name, None, child.lineno, at_import_time)
            elif isinstance(child, ast.ImportFrom):
                module = _resolve(child.module, child.level, importer, is_package)
                for alias in child.names:
                    yield Import(module, alias.name, child.lineno, at_import_time)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.body:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), False)
                for statement in child.orelse:
                    yield from walk(ast.Module(body=[statement], type_ignores=[]), at_import_time)
            else:
                yield from walk(child, at_import_time)

    yield from walk(tree, True)


def imported_modules(imp: Import, known: set[str]) -> set[str]:
    """The package module an import needs: `from a import b` needs `a.b` when that is a module (`a` is then
    only its parent package, already loading), else `a` (whose `b` must exist by then)."""
    if imp.name is not None and f"{imp.module}.{imp.name}" in known:
        return {f"{imp.module}.{imp.name}"}
    return {imp.module} & known


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports at import time."""
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = set()
        for imp in imports_of(path, name):
            if imp.at_import_time:
                graph[name] |= imported_modules(imp, known) - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path `a -> b -> ... -> a`) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module, by breadth-first search."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle in {component}")  # pragma: no cover - a component always has one


def imports_of_testutil(modules: dict[str, Path], testutil: str = TESTUTIL) -> list[str]:
    """`module:line` of every import of `testutil` by a module outside it, at any level."""
    found = []
    for name, path in modules.items():
        if name == testutil or name.startswith(f"{testutil}."):
            continue
        for imp in imports_of(path, name):
            if any(
                target == testutil or target.startswith(f"{testutil}.")
                for target in (imp.module, f"{imp.module}.{imp.name}" if imp.name else imp.module)
            ):
                found.append(f"{name}:{imp.line}")
    return found


# --- the rules --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module",
    [name for name in source_modules() if name != TESTUTIL and not name.startswith(f"{TESTUTIL}.")],
)
def test_production_code_never_imports_testutil(module: str) -> None:
    assert imports_of_testutil({module: source_modules()[module]}, TESTUTIL) == []


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph(source_modules()))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


_PARSER_ONLY = """
import json, sys
from vpn_packet.cli import build_parser
build_parser()
print(json.dumps(sorted(sys.modules)))
"""


@pytest.fixture(scope="module")
def loaded_by_the_parser() -> set[str]:
    """The modules a fresh interpreter has loaded after building the command's parser."""
    result = subprocess.run([sys.executable, "-c", _PARSER_ONLY], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


# Not checked: vpn_packet.dispatcher. The root package re-exports `Dispatcher` by contract
# (`from vpn_packet import Dispatcher`), and importing any submodule (vpn_packet.cli included) runs the root
# `__init__` first, so every command loads it; that is the package's API, not a layering fault.
@pytest.mark.parametrize(
    "module",
    [
        "vpn_packet.node.tun_node",
        "vpn_packet.node.node",
        "vpn_packet.node.config",
        "vpn_packet.transport.tun",
        "vpn_packet.transport.receiver",
        "vpn_packet.transport.tcp",
        "vpn_packet.transport.handshake",
        "vpn_packet.transport.identity",
        "cryptography",  # key handling: loaded by the commands that use it, when they run
    ],
)
def test_building_the_parser_loads_no_runtime(loaded_by_the_parser: set[str], module: str) -> None:
    assert "vpn_packet.cli" in loaded_by_the_parser
    assert module not in loaded_by_the_parser


@pytest.mark.parametrize("module", ["asyncio", "ssl", "cryptography", "vpn_packet.dispatcher", "rich"])
def test_a_bare_import_of_the_package_loads_no_runtime(module: str) -> None:
    """Issue 22: `import vpn_packet` loaded everything (about 55 ms); its re-exports are lazy now (PEP 562),
    so it loads the native core and nothing of the network stack until a name is used."""
    script = "import json, sys\nimport vpn_packet\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "vpn_packet._native" in loaded
    assert module not in loaded


# What `inspect` adds to the modules loaded at start-up (site-packages' `.pth` files differ by machine).
_INSPECT = """
import json, sys
_before = set(sys.modules)
from vpn_packet.cli import main
status = main(["inspect", sys.argv[1]])
print(json.dumps(sorted(set(sys.modules) - _before)))
sys.exit(status)
"""


@pytest.fixture(scope="module")
def loaded_by_inspect(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The modules a fresh interpreter has loaded after a whole `vpn-packet inspect` of a small capture."""
    from vpn_packet.testutil.packets import UDP, ipv4_packet
    from vpn_packet.testutil.pcap import LINKTYPE_RAW, pcap_bytes

    path = tmp_path_factory.mktemp("inspect") / "one.pcap"
    path.write_bytes(pcap_bytes([ipv4_packet("10.0.0.2", "10.0.0.1", UDP, 1, 2, b"x")], LINKTYPE_RAW))
    result = subprocess.run(
        [sys.executable, "-c", _INSPECT, str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


# Issue 22: `vpn-packet inspect` is a start-up race (10x tshark as a whole process): it loads what it runs
# and nothing else, not the other commands, the network stack, `rich` or `dataclasses`.
@pytest.mark.parametrize(
    "module",
    [
        "asyncio",
        "ssl",
        "cryptography",
        "rich",
        "dataclasses",
        "typing",
        "importlib.metadata",
        "vpn_packet.dispatcher",
        "vpn_packet.errors",  # loaded when an error is to be reported, not by a capture that reads fine
        "vpn_packet.tuning",
        "vpn_packet.cli.node",
        "vpn_packet.cli.demo",
        "vpn_packet.cli.status",
    ],
)
def test_inspect_loads_only_what_it_runs(loaded_by_inspect: set[str], module: str) -> None:
    assert "vpn_packet.capture" in loaded_by_inspect
    assert module not in loaded_by_inspect


# --- the checks can fail ----------------------------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    root = tmp_path / "pkg"
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return source_modules(root, "pkg")


def test_the_testutil_check_sees_every_form(tmp_path: Path) -> None:
    modules = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "import pkg.testutil.fakes\n",
            "b.py": "def f():\n    from pkg.testutil import fakes\n",
            "c.py": "from pkg import testutil\n",
            "d.py": "class C:\n    def m(self):\n        from .testutil.fakes import x\n",
            "e.py": "from pkg import types\nimport pkg.testutils\n",  # neither is testutil
            "testutil/__init__.py": "from pkg.testutil import fakes\n",  # testutil may import itself
            "testutil/fakes.py": "",
            "types.py": "",
        },
    )
    assert imports_of_testutil(modules, "pkg.testutil") == ["pkg.a:1", "pkg.b:2", "pkg.c:1", "pkg.d:3"]


def test_the_cycle_check_follows_module_level_imports_only(tmp_path: Path) -> None:
    modules = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg import b\n",  # `b` is a submodule: a -> b
            "b.py": "from .c import thing\n",  # b -> c
            "c.py": "try:\n    import pkg.a\nexcept ImportError:\n    pass\n",  # c -> a: the cycle
            "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.e\n",
            "e.py": "def f():\n    import pkg.d\n",  # d <-> e only at type-checking and call time
            "f.py": "from pkg import VALUE\n",  # a name of pkg/__init__: f -> pkg, no cycle
        },
    )
    graph = import_graph(modules)
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.d"] == set()
    assert graph["pkg.e"] == set()
    assert graph["pkg.f"] == {"pkg"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_the_parser_check_sees_a_module_loaded_in_a_fresh_interpreter() -> None:
    script = "import json, sys\nimport vpn_packet.transport.tun\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "vpn_packet.transport.tun" in json.loads(result.stdout.strip().splitlines()[-1])


# --- every exception in one module -------------------------------------------------------------------------


def exception_classes_outside_errors(modules: dict[str, Path], package: str = PACKAGE) -> list[str]:
    """Public classes outside `vpn_packet.errors` (and testutil) that derive from an exception: by name, a
    base ending in `Error`, `Exception` or `Warning`. Private ones (`_Failed`) are internal control flow."""
    found = []
    for name, path in modules.items():
        if name == f"{package}.errors" or name.startswith(TESTUTIL):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                continue
            bases = [ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases]
            if any(b.endswith(("Error", "Exception", "Warning")) for b in bases):
                found.append(f"{name}.{node.name}")
    return found


def test_every_exception_is_defined_in_errors() -> None:
    assert exception_classes_outside_errors(source_modules()) == []


def test_the_exception_check_sees_a_stray_class(tmp_path: Path) -> None:
    tree = _tree(tmp_path, {"errors.py": "class A(Exception): ...\n", "x.py": "class B(ValueError): ...\n"})
    assert exception_classes_outside_errors(tree, "pkg") == ["pkg.x.B"]


def test_a_config_without_discovery_loads_no_mesh_and_no_etcd_client(tmp_path: Path) -> None:
    """Issue 21: the etcd client (the mesh extra) is imported only when `[discovery]` is configured."""
    config = tmp_path / "node.toml"
    config.write_text(
        '[interface]\nname = "vpn0"\naddress = "10.8.0.1/24"\n[listen]\naddress = "0.0.0.0:7000"\n'
        '[node]\nid = "a"\ninsecure = true\n[[peers]]\nid = "b"\nendpoint = "192.168.77.2:7000"\n'
        'allowed_ips = ["10.8.0.2/32"]\n'
    )
    code = (
        "import sys, json\n"
        "from vpn_packet.node.config import load_config\n"
        "from vpn_packet.cli import build_parser\n"
        f"load_config({str(config)!r})\n"
        "build_parser()\n"
        "loaded = [m for m in sys.modules if m.startswith(('vpn_packet.mesh', 'aetcd', 'grpc'))]\n"
        "print(json.dumps(sorted(loaded)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []
