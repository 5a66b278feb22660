"""The state of one pipeline run, handed from stage to stage.

A :class:`BuildRun` is made once per request from its :class:`ResolvedRequest` and keeps
what the stages learn (rendered Dockerfiles, timings, attempts, events), so no stage asks
again for what an earlier one already knew.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pfbuild.client.errors import BadRequest
from pfbuild.client.inputs import read_bounded
from pfbuild.client.models import Attempt, JobState, Timings
from pfbuild.client.settings import Settings
from pfbuild.worker import layout
from pfbuild.worker.artifacts import atomic_write_text
from pfbuild.worker.build.context import ContextScan, scan_context
from pfbuild.worker.build.render import Variant, dockerfile_name, render
from pfbuild.worker.build.resolve import ResolvedRequest
from pfbuild.worker.caches.trust import TrustStore
from pfbuild.worker.engine import Abort, Engine, ImageInfo

__all__ = ["BuildRun", "Progress", "no_progress"]


class Progress(Protocol):
    """``progress(state, **info)``: called at each stage change; ``BUILDING`` also carries
    ``step``/``steps``/``line`` as log lines arrive."""

    def __call__(self, state: JobState, **info: Any) -> None: ...


def no_progress(state: JobState, **info: Any) -> None:
    pass


@dataclass
class BuildRun:
    """One request on its way through the pipeline."""

    resolved: ResolvedRequest
    settings: Settings
    engine: Engine
    progress: Progress
    worker: str
    guard: Callable[[], None] = lambda: None
    fence: int | None = None  # the profile lock's fence, when run under the queue's lock
    abort: Abort | None = None  # stops the engine's build when the job is cancelled
    timings: Timings = field(default_factory=Timings)
    attempts: list[Attempt] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    cached: ImageInfo | None = None  # what the tag named before this run, if checked
    _scan: ContextScan | None = None
    _rendered: dict[Variant, str] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """The profile's newest build (``:latest``): what builds, tarballs and pushes name."""
        return self.settings.image_tag(self.resolved.profile_id)

    @property
    def code_tag(self) -> str:
        """The image of this run's code (``:{code}``): what the answer names."""
        return self.settings.code_tag(self.resolved.profile_id, self.scan().digest)

    @property
    def base_image(self) -> str:
        return self.settings.base_image(self.resolved.profile.python_version)

    @property
    def trust(self) -> TrustStore:
        """The worker's records of the tarballs it saved (what the cache trusts)."""
        return TrustStore(self.settings.trust_dir())

    @property
    def log_path(self) -> Path:
        return self.resolved.artifacts / layout.BUILD_LOG

    def scan(self) -> ContextScan:
        """The build context's entries and code digest, read once per run."""
        if self._scan is None:
            self._scan = scan_context(self.resolved.repo_dir)
        return self._scan

    @contextmanager
    def stage(self, state: JobState) -> Iterator[None]:
        """Report ``state`` and add the time spent in the body to its timing field."""
        self.progress(state)
        start = time.monotonic()
        try:
            yield
        finally:
            if state.timing:
                spent = getattr(self.timings, state.timing) + time.monotonic() - start
                setattr(self.timings, state.timing, spent)

    def dockerfile(self, variant: Variant) -> tuple[Path, str]:
        """The variant's Dockerfile: rendered once per run, written only when it changed."""
        path = self.resolved.artifacts / dockerfile_name(variant)
        if variant not in self._rendered:
            text = render(
                self.resolved.profile,
                variant,
                base_image=self.base_image,
                archive_url=self.settings.debian_archive_url,
            )
            self._rendered[variant] = text
            # deterministic text: on a cache hit the file is already right, and an
            # fsync'd rewrite would be the costliest step of the hit
            if not _holds(path, text.encode("utf-8")):
                atomic_write_text(path, text)
        return path, self._rendered[variant]


def _holds(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a regular file (not a link) holding exactly ``data``."""
    try:
        return read_bounded(path, what=path.name, limit=len(data), follow_symlinks=False) == data
    except BadRequest:  # missing, a link, a FIFO, longer: rewrite it
        return False
