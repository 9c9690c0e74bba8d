"""The architecture as the folders draw it, checked from the imports (type-checking-only imports included):
the route is one way (api -> scheduling -> generation), nothing below the API sees protobuf or gRPC, the model
store knows nothing of the server, and no module imports itself back through a cycle."""

from __future__ import annotations

import ast
from collections.abc import Collection
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "modelstore")
# What the server may import from the model store: its front door.
STORE_FRONT_DOOR = {"modelstore", "modelstore.errors", "modelstore.units"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: Collection[str] = ()) -> set[str]:
    """Every module `path` imports, absolute, whether or not under TYPE_CHECKING or inside a function.

    `from pkg import sub`, where `pkg.sub` is one of `modules`, imports `pkg.sub` alone: `pkg` is then only the
    submodule's parent package, which Python imports first for any of its submodules, not a use of what its
    `__init__` defines (within `pkg` itself it is already being imported)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found


MODULES = {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}
GRAPH = {name: {m for m in _imports(path, MODULES) if m in MODULES and m != name} for name, path in MODULES.items()}


def _in(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def test_no_module_imports_itself_back_through_a_cycle() -> None:
    def reaches(start: str, target: str) -> list[str] | None:
        seen: set[str] = set()
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in GRAPH[node]:
                if nxt == target:
                    return [*path, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [cycle for name in GRAPH if (cycle := reaches(name, name)) is not None]
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("room", ["server.scheduling", "server.generation", "server.core.domain", "server.core.errors"])
def test_below_the_api_nothing_sees_protobuf_or_grpc(room: str) -> None:
    for name in [m for m in MODULES if _in(m, room)]:
        bad = {m for m in _imports(MODULES[name]) if m.split(".")[0] in ("refinery", "grpc", "google")}
        bad |= {m for m in GRAPH[name] if _in(m, "server.api") or _in(m, "server.cli")}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_generation_does_not_reach_back_into_scheduling() -> None:
    for name in [m for m in MODULES if _in(m, "server.generation")]:
        back = {m for m in GRAPH[name] if _in(m, "server.scheduling") or _in(m, "server.app")}
        assert not back, f"{name} imports {sorted(back)}"


def test_the_server_uses_the_model_store_through_its_front_door() -> None:
    for name in [m for m in MODULES if _in(m, "server")]:
        inside = {m for m in GRAPH[name] if _in(m, "modelstore") and m not in STORE_FRONT_DOOR}
        assert not inside, f"{name} imports {sorted(inside)}"


def test_the_model_store_knows_nothing_of_the_server_or_grpc() -> None:
    for name in [m for m in MODULES if _in(m, "modelstore")]:
        bad = {m for m in _imports(MODULES[name]) if m.split(".")[0] in ("server", "refinery", "grpc")}
        assert not bad, f"{name} imports {sorted(bad)}"
