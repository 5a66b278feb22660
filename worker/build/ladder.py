"""The build stage: build on the engine, climbing the retry ladder on a failure.

Each attempt renders its variant (once per run), streams every engine line to the build
log and to progress, and, when it fails, reads the log's tail for the next rung (see
:mod:`pfbuild.worker.build.failures`). The whole log of every attempt lands atomically as
``build.log``; a run whose lock was lost leaves no log behind, since the log is then
another worker's to write.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import deque
from typing import IO

from pfbuild.client.errors import BuildFailed, LockLost
from pfbuild.client.models import Attempt, FailureInfo, JobState
from pfbuild.worker import layout
from pfbuild.worker.artifacts import atomic_file
from pfbuild.worker.build import failures
from pfbuild.worker.build.context import DOCKERFILE_IN_CONTEXT, make_context
from pfbuild.worker.build.render import VARIANTS, Variant
from pfbuild.worker.build.run import BuildRun
from pfbuild.worker.engine import BuildOutcome, BuildSpec, ImageInfo, parse_step

__all__ = [
    "LABEL_CONTEXT",
    "LABEL_DOCKERFILE",
    "LABEL_PROFILE",
    "LABEL_REPOSITORY",
    "LABEL_VARIANT",
    "build_with_ladder",
]

# the classic builder's words when a parent layer went while a build stood on it
_LAYER_REMOVED = re.compile(r"unknown parent image ID|failed to set parent sha256:")

# A failed step is at the end of the log; classifying its tail keeps memory bounded.
_LOG_TAIL_LINES = 20_000
LABEL_PROFILE = "org.pfbuild.profile_id"
LABEL_VARIANT = "org.pfbuild.variant"
LABEL_DOCKERFILE = "org.pfbuild.dockerfile_sha256"
# the digest of the code COPY put in the image: what makes a cached image a hit
LABEL_CONTEXT = "org.pfbuild.context_sha256"
# the image repository the farm tags with: garbage collection of a dangling image (which
# has lost its tag) keeps to the farm that built it
LABEL_REPOSITORY = "org.pfbuild.image_repository"


def build_with_ladder(run: BuildRun, cached: ImageInfo | None) -> tuple[Variant, ImageInfo]:
    """Build ``run``'s image; returns the variant that worked and the image it made.

    ``cached`` is the image the tag named before (its layers seed the build cache).
    Raises :class:`BuildFailed` when no rung is left, after logging and counting it.
    """
    variant = VARIANTS["standard"]
    raced = False
    with atomic_file(run.log_path, on_error=_keep_log) as log_file:
        while True:
            outcome, seconds, tail = _attempt(run, variant, cached, log_file)
            if outcome.image is not None:
                run.guard()  # before the log is committed: a lost lock's log is not ours
                run.attempts.append(_attempt_record(run, variant, seconds))
                return variant, outcome.image
            failure = failures.classify(tail)
            run.attempts.append(_attempt_record(run, variant, seconds, failure))
            nxt = _next_rung(run, variant, tail)
            if nxt is None and not raced and _LAYER_REMOVED.search(tail):
                # a cached layer the build stood on was removed under it (an image removed
                # or collected on this engine meanwhile): the same variant, once more
                raced, nxt = True, variant
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
    raise _failed(run, variant, failure, outcome)


def _attempt(
    run: BuildRun, variant: Variant, cached: ImageInfo | None, log_file: IO[bytes]
) -> tuple[BuildOutcome, float, str]:
    """One build with one variant: its outcome, seconds, and the tail of its log."""
    _log(log_file, f"=== pfbuild: building {run.tag} as variant '{variant.name}'")
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
    outcome = _one_build(run, variant, cached, log_file, tail)
    return outcome, round(time.monotonic() - started, 3), "\n".join(tail)


def _attempt_record(
    run: BuildRun, variant: Variant, seconds: float, failure: FailureInfo | None = None
) -> Attempt:
    path, _ = run.dockerfile(variant)
    return Attempt(
        variant=variant.name,
        ok=failure is None,
        seconds=seconds,
        failure=failure,
        dockerfile_path=str(path),
    )


def _next_rung(run: BuildRun, variant: Variant, tail: str) -> Variant | None:
    profile = run.resolved.profile
    return failures.next_variant(
        variant,
        failures.read_symptoms(tail),
        python_version=profile.python_version,
        allow_unauth=profile.allow_unauthenticated_apt,
        unauth_max_python=run.settings.unauth_apt_max_python,
    )


def _failed(
    run: BuildRun, variant: Variant, failure: FailureInfo, outcome: BuildOutcome
) -> BuildFailed:
    """Count the failure in the repository's registry; the error the agent gets."""
    registry = layout.unsupported_registry(run.resolved.repo_dir)
    failures.record_unsupported(registry, run.resolved.profile_id, failure, variant=variant.name)
    return BuildFailed(
        f"building {run.tag} failed ({failure.failure_class.value}) after "
        f"{len(run.attempts)} attempt(s): {failure.evidence or outcome.error}",
        failure=failure,
        build_log_path=str(run.log_path),
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
    run: BuildRun,
    variant: Variant,
    cached: ImageInfo | None,
    log_file: IO[bytes],
    tail: deque[str],
) -> BuildOutcome:
    step: tuple[int, int] | None = None

    def on_line(line: str) -> None:
        nonlocal step
        tail.append(line)
        _log(log_file, line)
        step = parse_step(line) or step
        run.progress(
            JobState.BUILDING,
            step=step[0] if step else None,
            steps=step[1] if step else None,
            line=line,
        )

    _, text = run.dockerfile(variant)
    context = make_context(run.scan(), text)
    try:
        spec = BuildSpec(
            tag=run.tag,
            dockerfile=DOCKERFILE_IN_CONTEXT,
            # The classic builder trusts *only* the cache_from images when the list is not
            # empty, so naming a tag that does not exist would disable the layer cache.
            cache_from=[run.tag] if cached is not None else [],
            nocache=run.resolved.request.force_rebuild,
            labels={
                LABEL_PROFILE: run.resolved.profile_id,
                LABEL_VARIANT: variant.name,
                LABEL_DOCKERFILE: hashlib.sha256(text.encode()).hexdigest(),
                LABEL_CONTEXT: run.scan().digest,
                LABEL_REPOSITORY: run.settings.image_repository,
            },
            idle_timeout=run.settings.idle_timeout or None,
            abort=run.abort,
        )
        return run.engine.build(context.fileobj, spec, on_line)
    finally:
        context.close()
