"""The registry tier: a Docker registry every host shares, as a layer cache.

An image is kept at ``{registry}/{image_repository}/{profile_id}:latest``
(:meth:`Settings.registry_ref`). Unlike a tarball, which repeats the base and apt layers
in every profile's file, a registry stores each layer once, and a pull fetches only the
layers the engine lacks: for a second profile on a host that holds the base layers, a
push or pull takes tens of milliseconds where a tarball takes seconds.

The tier never fails a build: an unreachable or refusing registry is recorded as an
event of the run and the pipeline goes on to the next tier (tarball, then build).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pfbuild.client.models import RegistryInfo
from pfbuild.client.settings import Settings
from pfbuild.worker.engine import Engine, RegistryFailed, Transfer

__all__ = ["fetch", "publish"]

log = logging.getLogger(__name__)


def _moved(
    move: Callable[[str], Transfer | None], ref: str, what: str, events: list[str]
) -> RegistryInfo | None:
    """Run ``move(ref)``; a registry failure is an event of the run, never its end."""
    try:
        moved = move(ref)
    except RegistryFailed as exc:
        events.append(f"registry {what} of {ref} failed ({exc}); trying without the registry")
        log.warning("%s of %s failed: %s", what, ref, exc)
        return None
    if moved is None:
        return None
    return RegistryInfo(reference=ref, digest=moved.digest, bytes=moved.bytes)


def fetch(
    engine: Engine, settings: Settings, profile_id: str, events: list[str]
) -> RegistryInfo | None:
    """Pull the profile's image and tag it ``{image_repository}/{profile_id}:latest``.

    None when no registry is set, the registry lacks the image, or it failed (then an
    event says why).
    """
    ref = settings.registry_ref(profile_id)
    if ref is None:
        return None
    info = _moved(engine.pull, ref, "pull", events)
    if info is not None:
        engine.tag(ref, settings.image_tag(profile_id))
        engine.remove(ref)  # only untags: the local tag holds the layers
    return info


def publish(
    engine: Engine, settings: Settings, profile_id: str, events: list[str]
) -> RegistryInfo | None:
    """Push the profile's local image to the registry; None without one or on failure."""
    ref = settings.registry_ref(profile_id)
    if ref is None:
        return None
    engine.tag(settings.image_tag(profile_id), ref)
    try:
        return _moved(engine.push, ref, "push", events)
    finally:
        engine.remove(ref)
