"""The embedded default: ``pfbuild submit --wait`` with no ``PFBUILD_REDIS_URL``.

A hit needs nothing started: :func:`answer_hit` asks the pipeline's own hit check
(:func:`pfbuild.worker.pipeline.reuse_local`: the code tag on the local engine, its context
digest label against the request's code), which takes no lock, as on a farm's worker.

Anything else (a miss, a forced rebuild, a tarball to load) runs the pipeline in this
process (:func:`run_embedded`), as ``pfbuild build`` does: under the profile's file lock on
this host, which is what makes one build per profile across processes here (a broker in
the process would be its own and serialise nothing beyond it). Its answer goes out as
soon as the image is on the engine: a new image is published (its tarball saved) by a
process of its own, handed the publish lock, which outlives the command (docs/design.md,
"Publishing").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pfbuild.client.settings import Settings

if TYPE_CHECKING:
    from pfbuild.client.models import BuildAnswer, BuildRequest
    from pfbuild.worker.build.run import Progress

__all__ = ["answer_hit", "engine_hit_check", "run_embedded"]


def answer_hit(settings: Settings, request: BuildRequest) -> BuildAnswer | None:
    """The answer when the local engine's tag holds this very code, with no broker or
    worker started; None when something must be built (or fetched) under the lock.

    Raises what the worker's hit path raises: BadRequest for a request the worker would
    refuse, EngineUnavailable when the engine does not answer (the embedded farm has no
    other host to hand the job to)."""
    if request.force_rebuild:
        return None
    # imported here: the client's commands load this module without the docker SDK
    from pfbuild.worker.build.resolve import resolve_request
    from pfbuild.worker.engine import engine_from_settings
    from pfbuild.worker.pipeline import reuse_local
    from pfbuild.worker.publish import Pending, spawn_detached

    def finish(pending: Pending) -> None:
        # a publication of this very image that a killed publisher left pending: a
        # process of its own finishes it, as after a build, and the command exits
        spawn_detached(pending, settings.publish_niceness)

    resolved = resolve_request(request, settings)
    return reuse_local(resolved, settings, engine_from_settings(settings), handoff=finish)


def run_embedded(
    settings: Settings, request: BuildRequest, progress: Progress | None = None
) -> BuildAnswer:
    """What the embedded default does when :func:`answer_hit` found no hit: the whole
    pipeline here, under the profile's file lock; a new image's publications go to a
    process of their own as soon as its answer is made (the command exits meanwhile).

    Raises what the pipeline raises (BadRequest, BuildFailed, EngineUnavailable, ...)."""
    from pfbuild.worker.build.resolve import resolve_request
    from pfbuild.worker.engine import engine_from_settings
    from pfbuild.worker.pipeline import run_build
    from pfbuild.worker.publish import Pending, spawn_detached

    def handoff(pending: Pending) -> None:
        spawn_detached(pending, settings.publish_niceness)

    from pfbuild.worker.build.run import no_progress

    resolved = resolve_request(request, settings)
    engine = engine_from_settings(settings)
    return run_build(resolved, settings, engine, progress=progress or no_progress,
                     handoff=handoff)


def engine_hit_check(settings: Settings, answer: BuildAnswer) -> dict[str, Any] | None:
    """How the next identical command tells, before it loads itself, that the local engine
    still holds ``answer``'s image (``client/quickhit.py``): the engine and its API version,
    and this host's publication record of the profile as it is now. None while a
    publication of the profile is pending: such a hit is not remembered."""
    from pfbuild.client.quickhit import file_stat
    from pfbuild.worker.engine import engine_from_settings
    from pfbuild.worker.publish import current, record_path

    record = str(record_path(settings, answer.profile_id))
    record_stat = file_stat(record)  # before it is read: a change after shows next time
    found = current(settings, answer.profile_id)
    if found is not None and found.pending:
        return None
    engine = engine_from_settings(settings)
    return {
        "engine": settings.docker_host_name(),
        "api_version": engine.api.api_version,
        "record": record,
        "record_stat": record_stat,
        "worker": settings.host_id,
    }
