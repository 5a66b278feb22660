"""One request, start to answer, in three steps: reuse → build → publish.

- **reuse**: the image the engine already holds under the profile's tag, else the one
  in the shared registry (``PFBUILD_REGISTRY``, :mod:`pfbuild.worker.caches.registry`), else a
  saved tarball streamed into the engine;
- **build**: the Dockerfile built on the engine, climbing the retry ladder
  (:mod:`pfbuild.worker.build.ladder`);
- **publish**: the new image pushed to the registry and saved as a tarball for other
  hosts (:mod:`pfbuild.worker.publish`): handed on, to run after the answer, when the
  caller gives a ``handoff`` (the queue's task), else run before it (``pfbuild build``).

Each step hands the next what it made (the image, the rendered text) instead of asking the
engine again. The queue's task and ``pfbuild build`` are thin shells around
:func:`run_build`; the rules are in docs/design.md.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import requests

from pfbuild.client.errors import EngineUnavailable, StorageError, TarballRejected
from pfbuild.client.models import (
    BuildAnswer,
    CacheSource,
    JobState,
    Manifest,
    Publication,
    PublishKind,
    RegistryInfo,
    TarballInfo,
    Timings,
)
from pfbuild.client.settings import Settings
from pfbuild.worker import layout, publish
from pfbuild.worker.artifacts import atomic_write_text, exclusive_lock
from pfbuild.worker.build.ladder import LABEL_CONTEXT, LABEL_VARIANT, build_with_ladder
from pfbuild.worker.build.render import VARIANTS, Variant
from pfbuild.worker.build.resolve import ResolvedRequest, resolve_request
from pfbuild.worker.build.run import BuildRun, Progress, no_progress
from pfbuild.worker.caches import registry, tarball
from pfbuild.worker.engine import Abort, Engine, ImageInfo
from pfbuild.worker.publish import Pending

__all__ = [
    "Handoff",
    "Pending",
    "Progress",
    "ResolvedRequest",
    "resolve_request",
    "reuse_local",
    "run_build",
]

# ``handoff(pending)``: takes a new image's publications (and their publish lock) to run
# once the answer has gone out
Handoff = Callable[[Pending], None]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Image:
    """What reuse or build produced: the image, where it came from, its tarball, and
    what is published of it."""

    info: ImageInfo
    source: CacheSource
    variant: Variant
    tarball: TarballInfo | None = None
    registry: RegistryInfo | None = None
    publications: dict[PublishKind, Publication] = field(default_factory=dict)


@functools.cache
def _pfbuild_version() -> str:
    try:
        return version("pfbuild")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def run_build(
    resolved: ResolvedRequest,
    settings: Settings,
    engine: Engine,
    *,
    progress: Progress = no_progress,
    worker: str | None = None,
    guard: Callable[[], None] | None = None,
    fence: int | None = None,
    abort: Abort | None = None,
    timings: Timings | None = None,
    events: list[str] | None = None,
    handoff: Handoff | None = None,
    wait_for_publication: bool = True,
) -> BuildAnswer:
    """Run the pipeline for one resolved request and return its answer.

    Raises :class:`BuildFailed` when every variant tried failed (the log and
    ``unsupported_registry.json`` are written first), :class:`EngineUnavailable` when the
    engine stops answering, :class:`StorageError` when the build's files cannot be
    written. ``guard`` is called before every write others will read (the tarball, the
    manifest) and may raise to stop the run; ``timings`` carries stages measured before
    the pipeline (queue, lock), ``events`` what happened to the job before it (a hand-back).
    A new image's publications go to ``handoff`` once its answer is made (their record
    says ``pending``), or run before the answer without one. ``wait_for_publication``:
    first wait for a publication of the profile running on this host (its publish lock);
    the queue's task does not when its publications run under the profile's Redis lock,
    which already serialises them, so that a publisher stalled past that lock never holds
    up the lock's next holder (the fences keep the stalled one from committing).
    """
    started = time.monotonic()
    run = BuildRun(
        resolved,
        settings,
        engine,
        progress,
        worker or f"{settings.host_id}:{os.getpid()}",
        guard=guard or (lambda: None),
        fence=fence,
        abort=abort,
        timings=timings.model_copy() if timings else Timings(),
        events=list(events or []),
    )
    try:
        resolved.artifacts.mkdir(parents=True, exist_ok=True)
        # one run per profile on this host at a time (the queue's Redis lock covers hosts)
        with exclusive_lock(resolved.artifacts / ".lock"):
            _sweep(resolved, older_than=settings.build_time_limit)
            return _reuse_or_build(run, started, handoff, wait_for_publication)
    except requests.RequestException as exc:  # an OSError too, but the engine's fault
        raise EngineUnavailable(f"the Docker engine failed: {exc}") from None
    except OSError as exc:
        raise StorageError(f"cannot read or write the files of this build: {exc}") from None


def reuse_local(
    resolved: ResolvedRequest,
    settings: Settings,
    engine: Engine,
    *,
    worker: str | None = None,
    timings: Timings | None = None,
    events: list[str] | None = None,
    handoff: Handoff | None = None,
) -> BuildAnswer | None:
    """The hit path: the answer if this engine's tag holds this very code, else None.

    Takes no lock: it only reads the engine and rewrites this request's own manifest
    (atomically, not fsynced: a crash loses nothing the next hit does not write again).
    The answer says what is published of the image (the host's publication record); a
    publication of it left pending by a publisher that died goes to ``handoff``.
    A miss, or a forced rebuild, goes the whole way through :func:`run_build`.
    """
    if resolved.request.force_rebuild:
        return None
    started = time.monotonic()
    run = BuildRun(
        resolved,
        settings,
        engine,
        no_progress,
        worker or f"{settings.host_id}:{os.getpid()}",
        timings=timings.model_copy() if timings else Timings(),
        events=list(events or []),
    )
    try:
        with run.stage(JobState.CHECKING_CACHE):
            held = _held_here(run)
            if held is None:
                return None
        resolved.artifacts.mkdir(parents=True, exist_ok=True)
        record = _record_of(run, held)
        published = {k: p.model_copy() for k, p in record.publications.items()} if record else {}
        image = Image(held, "local", _variant_of(held), publications=published)
        answer = _answer(run, image, started)
        if handoff is not None and record is not None and record.pending:
            pending = publish.claim(settings, record)  # None while its publisher lives
            if pending is not None:
                handoff(pending)
        return answer
    except requests.RequestException as exc:
        raise EngineUnavailable(f"the Docker engine failed: {exc}") from None
    except OSError as exc:
        raise StorageError(f"cannot read or write the files of this build: {exc}") from None


def _sweep(resolved: ResolvedRequest, older_than: float) -> None:
    """Remove temp files a killed run left of this profile's files. Only those untouched
    for longer than any build may run: a live run writes its temp files all the time."""
    name = layout.tarball_name(resolved.profile_id)
    fenced = layout.tarball_name(resolved.profile_id, 0).replace("0", "*", 1)
    stale = list(resolved.artifacts.glob(".*.tmp"))
    if resolved.cache_dir.is_dir():
        for base in (name, fenced):
            stale += list(resolved.cache_dir.glob(f".{base}.*.tmp"))
    cutoff = time.time() - older_than
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                log.info("removing %s, left by an interrupted run", path)
                path.unlink()


def _variant_of(info: ImageInfo) -> Variant:
    return VARIANTS.get(info.labels.get(LABEL_VARIANT, "standard"), VARIANTS["standard"])


def _holds_this_code(run: BuildRun, info: ImageInfo, where: str) -> bool:
    """Whether ``info`` was built from the code about to be built; an event if not."""
    theirs, ours = info.labels.get(LABEL_CONTEXT), run.scan().digest
    if theirs == ours:
        return True
    run.events.append(
        f"context changed since the {where} image (it holds {theirs or 'unknown code'}, "
        f"this request {ours}); building"
    )
    return False


def _reuse(run: BuildRun) -> Image | None:
    """An image holding this very code, from the local engine or a saved tarball, unless
    a rebuild is forced. A cached image of the profile with other code is no hit: its
    layers still seed the build (``run.cached``)."""
    with run.stage(JobState.RENDERING):
        run.dockerfile(VARIANTS["standard"])
    with run.stage(JobState.CHECKING_CACHE):
        run.scan()
        if run.resolved.request.force_rebuild:
            # a forced rebuild still learns what the tag names: its layers seed cache_from
            run.cached = run.engine.inspect(run.tag)
            return None
        held = _held_here(run)
        if held is not None:
            return Image(held, "local", _variant_of(held))
    if run.cached is not None:
        _holds_this_code(run, run.cached, "local")  # it does not: say so, and build
        return None
    return _pull(run) or _load_tarball(run)


def _held_here(run: BuildRun) -> ImageInfo | None:
    """The image of this very code on this engine: under its code tag, else under the
    profile's ``:latest`` (which then gets the code tag too); None on a miss. What
    ``:latest`` names is kept in ``run.cached``: its layers seed a build."""
    digest = run.scan().digest
    own = run.engine.inspect(run.code_tag)
    if own is not None and own.labels.get(LABEL_CONTEXT) == digest:
        return own
    run.cached = run.engine.inspect(run.tag)
    if run.cached is None or run.cached.labels.get(LABEL_CONTEXT) != digest:
        return None
    _tag_code(run, run.cached)
    return run.cached


def _tag_code(run: BuildRun, info: ImageInfo) -> None:
    """Give an image that arrived in the engine (built, loaded, pulled, or tagged before
    code tags) the tag of the code its label says it holds. Tagged by id: the hit path
    takes no lock, and ``:latest`` may move meanwhile."""
    digest = info.labels.get(LABEL_CONTEXT)
    if digest:
        run.engine.tag(info.id, run.settings.code_tag(run.resolved.profile_id, digest))


def _pull(run: BuildRun) -> Image | None:
    """The image from the shared registry, if one is set and holds this very code."""
    if not run.settings.registry:
        return None
    with run.stage(JobState.PULLING_IMAGE):
        pulled = registry.fetch(
            run.engine, run.settings, run.resolved.profile_id, run.scan().digest, run.events
        )
        info = run.engine.inspect(run.tag) if pulled else None
    if pulled is None or info is None:
        return None
    run.cached = info  # other code: its layers still seed the build
    _tag_code(run, info)
    if not _holds_this_code(run, info, "registry"):
        return None
    return Image(info, "registry", _variant_of(info), registry=pulled)


def _load_tarball(run: BuildRun) -> Image | None:
    found = tarball.find_tarball(run.resolved.cache_dir, run.resolved.profile_id)
    if found is None:
        return None
    with run.stage(JobState.LOADING_TARBALL):
        try:
            loaded, info = tarball.load_tarball(run.engine, found, run.tag, trust=run.trust)
        except TarballRejected as exc:
            run.events.append(
                f"tarball {found} rejected ({exc.message}); moved to {exc.moved_to}; "
                "building instead"
            )
            return None
    run.cached = info
    _tag_code(run, info)  # the tarball carries :latest; its code tag comes from its label
    if not _holds_this_code(run, info, "tarball"):
        return None
    return Image(info, "tarball", _variant_of(info), loaded)


def _build(run: BuildRun) -> Image:
    with run.stage(JobState.BUILDING):
        variant, info = build_with_ladder(run, run.cached)
        _tag_code(run, info)
    return Image(info, "built", variant)


def _reuse_or_build(
    run: BuildRun, started: float, handoff: Handoff | None, wait: bool
) -> BuildAnswer:
    """Reuse or build, then answer. The image's publications are recorded (pending)
    before the answer and handed on, or run first when there is no ``handoff``. The
    profile's publish lock is taken first (waiting, with ``wait``, for a publication of
    it running on this host; a hit never gets here: it takes no lock)."""
    plock = publish.lock_of(run.settings, run.resolved.profile_id)
    plock.acquire(blocking=wait)  # not held: a stalled publisher has it (see run_build)
    handed = False  # the publish lock goes with the publication handed on
    try:
        image = _reuse(run) or _build(run)
        pending = _to_publish(run, image, plock)
        if pending is not None and handoff is None:
            image = _publish_now(run, image, pending)
            pending = None
        elif pending is not None:
            published = {k: p.model_copy() for k, p in pending.record.publications.items()}
            image = Image(image.info, image.source, image.variant, publications=published)
        answer = _answer(run, image, started)
        if pending is not None and handoff is not None:
            handed = True
            handoff(pending)
        return answer
    finally:
        if not handed:
            plock.release()


def _to_publish(run: BuildRun, image: Image, plock: publish.PublishLock) -> Pending | None:
    """What to publish of ``image``, recorded as pending: a new image's registry push
    and tarball (the tarball optional with a registry), or what a publisher that died
    left pending of this very image (its lock is ours now)."""
    settings, profile_id = run.settings, run.resolved.profile_id
    if image.source == "built":
        kinds: list[PublishKind] = ["registry"] if settings.registry else []
        if settings.tarball_cache or not settings.registry:
            kinds.append("tarball")
        return publish.begin(
            settings,
            profile_id=profile_id,
            image_id=image.info.id,
            context_sha256=run.scan().digest,
            kinds=kinds,
            cache_dir=run.resolved.cache_dir,
            fence=run.fence,
            manifest_path=run.resolved.artifacts / layout.MANIFEST,
            lock=plock,
        )
    record = _record_of(run, image.info) if image.source == "local" else None
    if record is None or not record.pending or plock.fd is None:
        return None  # nothing left to publish, or its publisher holds the lock
    run.events.append("finishing the publication a publisher that died left pending")
    pending = publish.adopt(settings, record, plock)
    pending.refence(run.fence)
    return pending


def _record_of(run: BuildRun, info: ImageInfo) -> publish.PublishRecord | None:
    """This host's publication record of the profile, if it is of this very image."""
    record = publish.current(run.settings, run.resolved.profile_id)
    return record if record is not None and record.spec.image_id == info.id else None


_STAGE_OF: dict[PublishKind, JobState] = {
    "tarball": JobState.SAVING_TARBALL,
    "registry": JobState.PUSHING_IMAGE,
}


def _publish_now(run: BuildRun, image: Image, pending: Pending) -> Image:
    """Publish before answering (no queue to hand the publication to), only while
    locked; releases the publish lock."""

    def report(kind: PublishKind, pub: Publication) -> None:
        stage = _STAGE_OF[kind]
        if pub.state == "pending":
            run.progress(stage)
        elif stage.timing and pub.seconds:
            setattr(run.timings, stage.timing, getattr(run.timings, stage.timing) + pub.seconds)

    try:
        done = publish.publish(pending, run.engine, run.settings, guard=run.guard, report=report)
    finally:
        pending.release()
    run.events.extend(pending.events)
    saved, pushed = done.get("tarball"), done.get("registry")
    return Image(
        image.info,
        image.source,
        image.variant,
        saved.tarball if saved else None,
        pushed.registry if pushed else None,
        {k: p.model_copy() for k, p in pending.record.publications.items()},
    )


def _manifest(run: BuildRun, image: Image, dockerfile_text: str) -> Manifest:
    resolved = run.resolved
    return Manifest(
        profile_id=resolved.profile_id,
        image_tag=run.code_tag,
        image_id=image.info.id,
        build_variant=image.variant.name,
        python_version=resolved.profile.python_version,
        base_image=run.base_image,
        dockerfile_sha256=hashlib.sha256(dockerfile_text.encode()).hexdigest(),
        context_sha256=run.scan().digest,
        cache_source=image.source,
        force_rebuild=resolved.request.force_rebuild,
        attempts=run.attempts,
        tarball=image.tarball,
        registry=image.registry,
        publications=image.publications,
        worker=run.worker,
        docker_host=run.settings.host_id,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        pfbuild_version=_pfbuild_version(),
        events=run.events,
    )


# What a manifest says about the image and how it was reached. A hit whose manifest on
# disk already says all this leaves the file as it is (its timings and created_at are the
# first such hit's; the answer carries this request's): a rename over a file costs more
# than the rest of a hit's work on the worker.
_IMAGE_FACTS = (
    "image_tag",
    "image_id",
    "context_sha256",
    "build_variant",
    "dockerfile_sha256",
    "cache_source",
    "tarball",
    "registry",
    "publications",
    "docker_host",
    "pfbuild_version",
)


_MANIFEST_MAX_BYTES = 4 * 1024 * 1024


def _records_this_image(path: Path, document: dict[str, object]) -> bool:
    """Whether the manifest at ``path`` already records ``document``'s image facts."""
    try:
        with path.open("rb") as fh:
            written = json.loads(fh.read(_MANIFEST_MAX_BYTES))
    except (OSError, ValueError):
        return False
    return isinstance(written, dict) and all(
        written.get(k) == document.get(k) for k in _IMAGE_FACTS
    )


def _answer(run: BuildRun, image: Image, started: float) -> BuildAnswer:
    """Write the manifest (and a note as the log of a reuse); the answer."""
    if image.source != "built" and not run.log_path.exists():
        atomic_write_text(
            run.log_path,
            f"{run.code_tag} reused from the {image.source} cache; no build ran for this profile "
            "here.\n",
        )
    dockerfile_path, text = run.dockerfile(image.variant)
    run.timings.total = run.timings.queue_wait + run.timings.lock_wait + time.monotonic() - started
    manifest = _manifest(run, image, text)
    manifest_path = run.resolved.artifacts / layout.MANIFEST
    run.guard()
    document = manifest.model_dump(mode="json")
    if image.source == "built" or not _records_this_image(manifest_path, document):
        # a reuse rewrites what it finds again next time; a build's manifest must last
        body = json.dumps(document, indent=2) + "\n"
        atomic_write_text(manifest_path, body, durable=image.source == "built")
    return BuildAnswer(
        image_tag=run.code_tag,
        profile_id=run.resolved.profile_id,
        reused_cache=image.source != "built",
        build_log_path=str(run.log_path),
        cache_source=image.source,
        image_id=image.info.id,
        context_sha256=run.scan().digest,
        build_variant=image.variant.name,
        manifest=manifest,
        manifest_path=str(manifest_path),
        dockerfile_path=str(dockerfile_path),
        timings=run.timings,
        worker=run.worker,
        docker_host=run.settings.host_id,
        attempts=run.attempts,
    )
