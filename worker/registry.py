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

from pfbuild.client.models import RegistryInfo
from pfbuild.client.settings import Settings
from pfbuild.worker.engine import Engine, RegistryFailed

__all__ = ["fetch", "publish"]

log = logging.getLogger(__name__)


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
    try:
        moved = engine.pull(ref)
    except RegistryFailed as exc:
        events.append(f"registry pull of {ref} failed ({exc}); trying the next tier")
        log.warning("pull of %s failed: %s", ref, exc)
        return None
    if moved is None:
        return None
    engine.tag(ref, settings.image_tag(profile_id))
    engine.remove(ref)  # only untags: the local tag holds the layers
    return RegistryInfo(reference=ref, digest=moved.digest, bytes=moved.bytes)


def publish(
    engine: Engine, settings: Settings, profile_id: str, events: list[str]
) -> RegistryInfo | None:
    """Push the profile's local image to the registry; None without one or on failure."""
    ref = settings.registry_ref(profile_id)
    if ref is None:
        return None
    engine.tag(settings.image_tag(profile_id), ref)
    try:
        moved = engine.push(ref)
    except RegistryFailed as exc:
        events.append(f"registry push of {ref} failed ({exc}); other hosts will build it")
        log.warning("push of %s failed: %s", ref, exc)
        return None
    finally:
        engine.remove(ref)
    return RegistryInfo(reference=ref, digest=moved.digest, bytes=moved.bytes)
