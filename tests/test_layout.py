"""The architecture as the folders draw it, checked from the imports (type-checking-only imports included):
the route is one way (api -> scheduling -> generation), nothing below the API sees protobuf or gRPC, the model
store knows nothing of the server, and no module imports itself back through a cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
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


@pytest.mark.parametrize("room", ["server.scheduling", "server.generation", "server.core"])
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


# The server's floors, lowest first: a module imports only from its own floor or those below it. The ground
# floor is what every room shares; `server.app` (and the start-up's prefetch) wires the rooms together; the CLI
# runs a server (`serve`, the in-process `generate`) or talks to one.
FLOORS = (
    ("server.core",),
    ("server.images",),
    ("server.generation",),
    ("server.scheduling",),
    ("server.api",),
    ("server.app", "server.prefetch", "server"),
    ("server.cli",),
)
# Rooms whose package `__init__` is their one public surface: from outside, only the package itself is imported.
FRONT_DOORS = ("server.generation", "server.scheduling", "server.images")


def _floor(module: str) -> int:
    # The longest matching room decides ("server" itself is the top floor's package, below the CLI).
    matches = [(len(room), level) for level, rooms in enumerate(FLOORS) for room in rooms if _in(module, room)]
    assert matches, f"{module} is on no floor: add its room to FLOORS"
    return max(matches)[1]


@pytest.mark.parametrize("name", [m for m in MODULES if _in(m, "server")])
def test_no_module_imports_a_floor_above_its_own(name: str) -> None:
    up = {m for m in GRAPH[name] if _in(m, "server") and _floor(m) > _floor(name)}
    assert not up, f"{name} (floor {_floor(name)}) imports upward: {sorted(up)}"


def test_the_image_store_stands_on_the_ground_floor_and_only_the_api_uses_it() -> None:
    """Images come in at the edge and reach the device as paths in the domain's `StoredImage`: the store is the
    API's (and the top floor builds it); the route below the API never calls it."""
    for name in [m for m in MODULES if _in(m, "server.images")]:
        above = {m for m in GRAPH[name] if _in(m, "server") and not (_in(m, "server.core") or _in(m, "server.images"))}
        assert not above, f"{name} imports {sorted(above)}: the image store stands on server.core alone"
    for room in ("server.scheduling", "server.generation"):
        for name in [m for m in MODULES if _in(m, room)]:
            images = {m for m in GRAPH[name] if _in(m, "server.images")}
            assert not images, f"{name} imports {sorted(images)}: only the API uses the image store"


@pytest.mark.parametrize("room", FRONT_DOORS)
def test_other_rooms_enter_through_the_front_door(room: str) -> None:
    for name in [m for m in MODULES if not _in(m, room)]:
        side = {m for m in GRAPH[name] if _in(m, room) and m != room}
        assert not side, f"{name} imports {sorted(side)}: use `from {room} import ...`"


def test_the_api_depends_on_the_engine_protocol_not_the_scheduler_class() -> None:
    for name in [m for m in MODULES if _in(m, "server.api")]:
        tree = ast.parse(MODULES[name].read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert "Scheduler" not in names, f"{name} imports the concrete Scheduler; type it as Engine"


def test_the_layout_checks_see_a_side_door(tmp_path: Path) -> None:
    """The graph the checks above walk counts a submodule import as that submodule, so a side door shows."""
    probe = tmp_path / "probe.py"
    probe.write_text("from server.scheduling import queue\nfrom server.generation.runner import run\n")
    assert _imports(probe, MODULES) == {"server.scheduling.queue", "server.generation.runner"}


def test_a_front_door_loads_a_room_only_as_far_as_its_caller_needs() -> None:
    """The API's views of the rooms (compile states, the engine protocol) and the CLI do not load the runner,
    the scheduler or diffusers' pipelines: the front doors import a name's module on first use."""
    probe = (
        "import sys, server.cli.main, server.api.convert, server.api.generation_service;"
        "print(sorted(m for m in ('server.generation.runner', 'server.scheduling.scheduler', 'diffusers')"
        " if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
