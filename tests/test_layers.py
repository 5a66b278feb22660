"""The house's floor plan: imports run downward only, between the worker's rooms and from
the client into the worker, and no module imports one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"client": "pfbuild.client", "worker": "pfbuild.worker"}

# A room's floor: a module may import its own room and any room on a lower floor.
# The worker's foundations, then the caches, the stages of a build, the pipeline that
# runs them, the farm around one run, operations, measures, and the app that wires it.
FLOORS = {
    "pfbuild.client": 0,
    "pfbuild.worker.engine": 1,
    "pfbuild.worker.imagewatch": 1,
    "pfbuild.worker.layout": 1,
    "pfbuild.worker.artifacts": 1,
    "pfbuild.worker.oplog": 1,
    "pfbuild.worker.caches": 2,
    "pfbuild.worker.build": 3,
    "pfbuild.worker.pipeline": 4,
    "pfbuild.worker.publish": 4,
    "pfbuild.worker.farm": 5,
    "pfbuild.worker.ops": 6,
    "pfbuild.worker.bench": 7,
    "pfbuild.worker.celery_app": 8,
    "pfbuild.worker.embedded": 8,
    "pfbuild.worker.cli": 8,
    "pfbuild.worker": 8,  # the package itself: the Celery app and the public names
}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [name, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every pfbuild module ``path`` imports, at its top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pfbuild.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pfbuild."):
            mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names} & MODULES.keys()
            out |= subs or {mod}
    return out


def _floor(module: str) -> int:
    room = max((r for r in FLOORS if module == r or module.startswith(r + ".")), key=len)
    return FLOORS[room]


def test_every_module_has_a_floor() -> None:
    assert [m for m in MODULES if not any(m == r or m.startswith(r + ".") for r in FLOORS)] == []


def test_imports_run_downward() -> None:
    up = [f"{src} -> {dst}" for src, path in MODULES.items() for dst in _imports(path)
          if dst in MODULES and _floor(dst) > _floor(src)]
    assert up == []


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = {m: _imports(p) & MODULES.keys() for m, p in MODULES.items()}
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, route = stack.pop()
            for nxt in graph[node] - packages:  # a package's __init__ re-exports: skip it
                if nxt == start:
                    circles.append(" -> ".join([*route, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*route, nxt]))
    assert circles == []


def test_every_room_says_what_it_is_for() -> None:
    rooms = [p for p in (ROOT / "worker").iterdir() if (p / "__init__.py").exists()]
    assert {p.name for p in rooms} == {"build", "caches", "farm", "ops", "bench"}
    for room in rooms:
        doc = ast.get_docstring(ast.parse((room / "__init__.py").read_text())) or ""
        assert "Floor" in doc and "never" in doc, room.name


def test_the_rule_catches_an_arrow_back_up(tmp_path: Path) -> None:
    """The check itself: a cache that imported the pipeline would be found."""
    bad = tmp_path / "x.py"
    bad.write_text("from pfbuild.worker.pipeline import run_build\n")
    assert any(_floor(d) > _floor("pfbuild.worker.caches.x") for d in _imports(bad))
