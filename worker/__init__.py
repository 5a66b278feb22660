"""pfbuild's worker side: the build pipeline over a real Docker engine."""

from pfbuild.worker.engine import DockerEngine, Engine
from pfbuild.worker.pipeline import resolve_request, run_build

__all__ = ["DockerEngine", "Engine", "resolve_request", "run_build"]
