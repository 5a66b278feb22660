"""pfbuild's worker side: the build pipeline over a real Docker engine, and the Celery
app that runs it (``celery -A pfbuild.worker worker`` finds ``app`` here).

The floor plan (imports run downward only; ``tests/test_layers.py`` checks it):

1. foundations, here: ``engine`` (and ``imagewatch``), ``layout``, ``artifacts``, ``oplog``;
2. ``caches/``: tarballs pfbuild saved, their trust records, the registry tier;
3. ``build/``: resolve, render, context, the build and its ladder, failures, one run;
4. ``pipeline``, here: reuse -> build -> answer; ``publish``: what follows the answer;
5. ``farm/``: the Celery task, locks, waits, liveness, results, hosts, progress;
6. ``ops/``: metrics, hooks, garbage collection, the ``gc`` command;
7. ``bench/``: the benchmarks and the real processes they start;
8. the app, here: ``celery_app``, ``embedded`` (the in-process farm), ``cli``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pfbuild.worker.build.resolve import resolve_request
    from pfbuild.worker.engine import DockerEngine, Engine
    from pfbuild.worker.pipeline import run_build

__all__ = ["DockerEngine", "Engine", "app", "resolve_request", "run_build"]

# Loaded on first use (PEP 562): importing any module of the worker runs this file first,
# and a command that needs one room must not pay for the docker SDK of another.
_HOME = {
    "DockerEngine": "engine",
    "Engine": "engine",
    "resolve_request": "build.resolve",
    "run_build": "pipeline",
}

_app: Any = None


def __getattr__(name: str) -> Any:
    # The Celery app is made on first use, so importing the pipeline reads no settings.
    global _app
    if name == "app":
        if _app is None:
            from pfbuild.worker.celery_app import create_app

            _app = create_app()
        return _app
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(name)
