"""pfbuild's worker side: the build pipeline over a real Docker engine, and the Celery
app that runs it (``celery -A pfbuild.worker worker`` finds ``app`` here)."""

from typing import Any

from pfbuild.worker.engine import DockerEngine, Engine
from pfbuild.worker.pipeline import run_build
from pfbuild.worker.resolve import resolve_request

__all__ = ["DockerEngine", "Engine", "app", "resolve_request", "run_build"]

_app: Any = None


def __getattr__(name: str) -> Any:
    # The Celery app is made on first use, so importing the pipeline reads no settings.
    global _app
    if name == "app":
        if _app is None:
            from pfbuild.worker.celery_app import create_app

            _app = create_app()
        return _app
    raise AttributeError(name)
