"""One request, start to answer: render → check image → load tarball → build → save → manifest.

Each stage lives in its own module; this one only calls them in order, times them,
reports progress through a callback, and writes the artifacts of SPEC §4 under
``{repo_dir}/.pf_manifest/image_build/{profile_id}/``. The queue's task (and the
``pfbuild build`` command) are thin shells around :func:`run_build`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any

import requests

from pfbuild.client.errors import BuildFailed, EngineUnavailable, LockLost, PfbuildError
from pfbuild.client.models import (
    Attempt,
    BuildAnswer,
    BuildRequest,
    CacheSource,
    Manifest,
    RegistryInfo,
    TarballInfo,
    Timings,
)
from pfbuild.client.settings import Settings
from pfbuild.worker import cache, failures, registry
from pfbuild.worker.artifacts import atomic_file, atomic_write_text, exclusive_lock
from pfbuild.worker.context import DOCKERFILE_IN_CONTEXT, make_context
from pfbuild.worker.engine import BuildOutcome, Engine, parse_step
from pfbuild.worker.render import VARIANTS, Variant, dockerfile_name, render
from pfbuild.worker.resolve import ResolvedRequest, resolve_request

__all__ = ["Progress", "ResolvedRequest", "resolve_request", "run_build"]

log = logging.getLogger(__name__)

Progress = Callable[..., None]
"""``progress(stage, **info)``: stage names are those of SPEC §5 (``rendering``,
``checking_cache``, ``loading_tarball``, ``building``, ``saving_tarball``); ``building``
also carries ``step``/``steps``/``line`` as log lines arrive."""

# A failed step is at the end of the log; classifying its tail keeps memory bounded.
_LOG_TAIL_LINES = 20_000
LABEL_PROFILE = "org.pfbuild.profile_id"
LABEL_VARIANT = "org.pfbuild.variant"
LABEL_DOCKERFILE = "org.pfbuild.dockerfile_sha256"


def _no_progress(stage: str, **info: Any) -> None:
    pass


@functools.cache
def _pfbuild_version() -> str:
    try:
        return version("pfbuild")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


@dataclass
class _Run:
    """Mutable state of one pipeline run."""

    job: ResolvedRequest
    settings: Settings
    engine: Engine
    progress: Progress
    worker: str
    guard: Callable[[], None] = lambda: None
    timings: Timings = field(default_factory=Timings)
    attempts: list[Attempt] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        return self.settings.image_tag(self.job.profile.profile_id)

    @contextmanager
    def stage(self, name: str, timing: str) -> Iterator[None]:
        self.progress(name)
        start = time.monotonic()
        try:
            yield
        finally:
            setattr(self.timings, timing, getattr(self.timings, timing) + time.monotonic() - start)

    def dockerfile(self, variant: Variant) -> tuple[Path, str]:
        profile = self.job.profile
        text = render(
            profile,
            variant,
            base_image=self.settings.base_image(profile.python_version),
            archive_url=self.settings.debian_archive_url,
        )
        path = self.job.artifacts / dockerfile_name(variant)
        # the text is deterministic: on a cache hit the file is already right, and an
        # fsync'd rewrite would be the costliest step of the hit
        if not (path.is_file() and path.read_bytes() == text.encode("utf-8")):
            atomic_write_text(path, text)
        return path, text


def run_build(
    request: BuildRequest,
    settings: Settings,
    engine: Engine,
    *,
    progress: Progress = _no_progress,
    worker: str | None = None,
    guard: Callable[[], None] = lambda: None,
    timings: Timings | None = None,
) -> BuildAnswer:
    """Run the whole pipeline for one request and return its answer.

    Raises :class:`BadRequest` before touching anything, :class:`BuildFailed` when every
    variant tried failed (the log and ``unsupported_registry.json`` are written first),
    and :class:`EngineUnavailable` when the engine stops answering. ``guard`` is called
    before every write others will read (the tarball, the manifest) and may raise to stop
    the run; ``timings`` carries stages measured before the pipeline (queue, lock).
    """
    started = time.monotonic()
    job = resolve_request(request, settings)
    run = _Run(
        job, settings, engine, progress, worker or f"{settings.host_id}:{os.getpid()}", guard=guard
    )
    if timings is not None:
        run.timings = timings.model_copy()
    try:
        job.artifacts.mkdir(parents=True, exist_ok=True)
        # one run per profile on this host at a time (the queue's Redis lock covers hosts)
        with exclusive_lock(job.artifacts / ".lock"):
            _sweep(job, older_than=settings.build_time_limit)
            return _pipeline(run, started)
    except requests.RequestException as exc:  # an OSError too, but the engine's fault
        raise EngineUnavailable(f"the Docker engine failed: {exc}") from None
    except OSError as exc:
        raise PfbuildError(f"cannot read or write the files of this build: {exc}") from None


def _sweep(job: ResolvedRequest, older_than: float) -> None:
    """Remove temp files a killed run left of this profile's files. Only those untouched
    for longer than any build may run: a live run writes its temp files all the time."""
    pid = job.profile.profile_id
    stale = list(job.artifacts.glob(".*.tmp"))
    if job.cache_dir.is_dir():
        stale += list(job.cache_dir.glob(f".{pid}.tar.zst.*.tmp"))
        stale += list(job.cache_dir.glob(f".{pid}.tar.zst.sha256.*.tmp"))
    cutoff = time.time() - older_than
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                log.info("removing %s, left by an interrupted run", path)
                path.unlink()


def _pipeline(run: _Run, started: float) -> BuildAnswer:
    job, request, settings, engine = run.job, run.job.request, run.settings, run.engine
    guard = run.guard

    with run.stage("rendering", "render"):
        dockerfile_path, _ = run.dockerfile(VARIANTS["standard"])

    source: CacheSource | None = None
    tarball: TarballInfo | None = None
    image = None
    with run.stage("checking_cache", "cache_check"):
        if not request.force_rebuild:
            image = engine.inspect(run.tag)
            source = "local" if image else None
    # the registry tier (PFBUILD_REGISTRY): after the engine, before the tarball
    in_registry: RegistryInfo | None = None
    if source is None and not request.force_rebuild and settings.registry:
        with run.stage("pulling_image", "pull"):
            in_registry = registry.fetch(engine, settings, job.profile.profile_id, run.events)
        if in_registry is not None:
            image = engine.inspect(run.tag)
            source = "registry"
    if source is None and not request.force_rebuild:
        found = cache.find_tarball(job.cache_dir, job.profile.profile_id)
        if found is not None:
            with run.stage("loading_tarball", "load"):
                try:
                    tarball = cache.load_tarball(engine, found, run.tag)
                    image = engine.inspect(run.tag)
                    source = "tarball"
                except cache.TarballRejected as exc:
                    run.events.append(
                        f"tarball {found} rejected ({exc.reason}); moved to "
                        f"{exc.moved_to}; building instead"
                    )
    log_path = job.artifacts / "build.log"
    if source is None:
        with run.stage("building", "build"):
            variant = _build_with_ladder(run, log_path)
        image = engine.inspect(run.tag)
        source = "built"
        if settings.tarball_cache or not settings.registry:
            with run.stage("saving_tarball", "save"):
                tarball = cache.save_tarball(
                    engine,
                    run.tag,
                    job.cache_dir,
                    job.profile.profile_id,
                    level=settings.zstd_level,
                    threads=settings.zstd_threads,
                    before_commit=guard,
                )
        if settings.registry:
            guard()  # a run that lost its lock publishes nothing
            with run.stage("pushing_image", "push"):
                in_registry = registry.publish(engine, settings, job.profile.profile_id, run.events)
    if image is None:
        raise PfbuildError(f"{run.tag} vanished from the engine right after it was made")
    variant_name = image.labels.get(LABEL_VARIANT, "standard")
    if variant_name not in VARIANTS:
        variant_name = "standard"
    if source != "built":
        variant = VARIANTS[variant_name]
        if not log_path.exists():
            atomic_write_text(
                log_path,
                f"{run.tag} reused from the {source} cache; no build ran for this profile here.\n",
            )
    dockerfile_path, text = run.dockerfile(variant)
    run.timings.total = (
        run.timings.queue_wait + run.timings.lock_wait + (time.monotonic() - started)
    )
    manifest = Manifest(
        profile_id=job.profile.profile_id,
        image_tag=run.tag,
        image_id=image.id,
        build_variant=variant.name,
        python_version=job.profile.python_version,
        base_image=settings.base_image(job.profile.python_version),
        dockerfile_sha256=hashlib.sha256(text.encode()).hexdigest(),
        cache_source=source,
        force_rebuild=request.force_rebuild,
        attempts=run.attempts,
        tarball=tarball,
        registry=in_registry,
        worker=run.worker,
        docker_host=settings.host_id,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        pfbuild_version=_pfbuild_version(),
        events=run.events,
    )
    manifest_path = job.artifacts / "manifest.json"
    guard()
    atomic_write_text(manifest_path, json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return BuildAnswer(
        image_tag=run.tag,
        profile_id=job.profile.profile_id,
        reused_cache=source != "built",
        build_log_path=str(log_path),
        cache_source=source,
        image_id=image.id,
        build_variant=variant.name,
        manifest=manifest,
        manifest_path=str(manifest_path),
        dockerfile_path=str(dockerfile_path),
        timings=run.timings,
        worker=run.worker,
        docker_host=settings.host_id,
        attempts=run.attempts,
    )


def _build_with_ladder(run: _Run, log_path: Path) -> Variant:
    """Build, climbing the retry ladder; the whole log lands atomically at ``log_path``."""
    job, profile = run.job, run.job.profile
    variant = VARIANTS["standard"]
    with atomic_file(log_path, on_error=_keep_log) as log_file:
        while True:
            dockerfile_path, text = run.dockerfile(variant)
            _log(log_file, f"=== pfbuild: building {run.tag} as variant '{variant.name}'")
            started = time.monotonic()
            lines: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
            outcome = _one_build(run, variant, text, log_file, lines)
            seconds = round(time.monotonic() - started, 3)
            if outcome.ok:
                run.guard()  # before the log is committed: a lost lock's log is not ours
                run.attempts.append(
                    Attempt(
                        variant=variant.name,
                        ok=True,
                        seconds=seconds,
                        dockerfile_path=str(dockerfile_path),
                    )
                )
                return variant
            log_text = "\n".join(lines)
            failure = failures.classify(log_text)
            run.attempts.append(
                Attempt(
                    variant=variant.name,
                    ok=False,
                    seconds=seconds,
                    failure=failure,
                    dockerfile_path=str(dockerfile_path),
                )
            )
            nxt = failures.next_variant(
                variant,
                failures.read_symptoms(log_text),
                python_version=profile.python_version,
                allow_unauth=profile.allow_unauthenticated_apt,
                unauth_max_python=run.settings.unauth_apt_max_python,
            )
            if nxt is None:
                _log(
                    log_file,
                    f"=== pfbuild: failed ({failure.failure_class.value}); "
                    "no rung of the retry ladder applies",
                )
                run.guard()
                break
            _log(
                log_file, f"=== pfbuild: variant '{variant.name}' failed; retrying as '{nxt.name}'"
            )
            variant = nxt
    registry = job.repo_dir / ".pf_manifest" / "unsupported_registry.json"
    failures.record_unsupported(registry, profile.profile_id, failure, variant=variant.name)
    raise BuildFailed(
        f"building {run.tag} failed ({failure.failure_class.value}) after "
        f"{len(run.attempts)} attempt(s): {failure.evidence or outcome.error}",
        failure=failure,
        build_log_path=str(log_path),
        details={"attempts": [a.model_dump(mode="json") for a in run.attempts]},
    )


def _keep_log(log_file: IO[bytes], exc: BaseException) -> bool:
    """An interrupted build's log is still kept (as build.log, with the reason at its end),
    unless the lock was lost: then the log is another worker's to write."""
    if isinstance(exc, LockLost):
        return False
    _log(log_file, f"=== pfbuild: interrupted: {type(exc).__name__}: {exc}")
    return True


def _log(log_file: IO[bytes], line: str) -> None:
    log_file.write(line.encode("utf-8", "replace") + b"\n")
    log_file.flush()


def _one_build(
    run: _Run, variant: Variant, text: str, log_file: IO[bytes], lines: deque[str]
) -> BuildOutcome:
    step: tuple[int, int] | None = None

    def on_line(line: str) -> None:
        nonlocal step
        lines.append(line)
        _log(log_file, line)
        step = parse_step(line) or step
        run.progress(
            "building", step=step[0] if step else None, steps=step[1] if step else None, line=line
        )

    context = make_context(run.job.repo_dir, text)
    try:
        tag = run.tag
        exists = run.engine.inspect(tag) is not None
        return run.engine.build(
            context.fileobj,
            tag=tag,
            dockerfile=DOCKERFILE_IN_CONTEXT,
            # The classic builder trusts *only* the cache_from images when the list is not
            # empty, so naming a tag that does not exist would disable the layer cache.
            cache_from=[tag] if exists else [],
            nocache=run.job.request.force_rebuild,
            labels={
                LABEL_PROFILE: run.job.profile.profile_id,
                LABEL_VARIANT: variant.name,
                LABEL_DOCKERFILE: hashlib.sha256(text.encode()).hexdigest(),
            },
            on_line=on_line,
        )
    finally:
        context.close()
