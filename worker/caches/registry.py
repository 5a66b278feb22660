"""The registry tier: a Docker registry every host shares, as a layer cache.

An image is kept at ``{registry}/{image_repository}/{profile_id}:{code}`` (the code in
it, as its local code tag) and at ``...:latest`` (the profile's newest push)
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
from pfbuild.client.settings import Settings, code_of
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
    engine: Engine, settings: Settings, profile_id: str, context_sha256: str, events: list[str]
) -> RegistryInfo | None:
    """Pull the image of this code (its code tag), else the profile's ``:latest`` (an
    image pushed before code tags, or other code whose layers seed the build), and tag it
    ``{image_repository}/{profile_id}:latest`` locally; the pipeline gives it its code tag
    from its label.

    None when no registry is set, the registry lacks both, or it failed (then an event
    says why, and ``:latest`` is not tried).
    """
    code_ref = settings.registry_ref(profile_id, code_of(context_sha256))
    latest_ref = settings.registry_ref(profile_id)
    if code_ref is None or latest_ref is None:
        return None
    for ref in (code_ref, latest_ref):
        try:
            moved = engine.pull(ref)
        except RegistryFailed as exc:
            events.append(f"registry pull of {ref} failed ({exc}); trying without the registry")
            log.warning("pull of %s failed: %s", ref, exc)
            return None
        if moved is not None:
            engine.tag(ref, settings.image_tag(profile_id))
            engine.remove(ref)  # only untags: the local tag holds the layers
            return RegistryInfo(reference=ref, digest=moved.digest, bytes=moved.bytes)
    return None


def publish(
    engine: Engine, settings: Settings, profile_id: str, context_sha256: str, events: list[str]
) -> RegistryInfo | None:
    """Push the profile's local image under its code tag, then as ``:latest`` (the layers
    are there by then: a manifest put); what the code tag's push recorded, or None without
    a registry or on failure."""
    code_ref = settings.registry_ref(profile_id, code_of(context_sha256))
    latest_ref = settings.registry_ref(profile_id)
    if code_ref is None or latest_ref is None:
        return None
    refs = (code_ref, latest_ref)
    for ref in refs:
        engine.tag(settings.image_tag(profile_id), ref)
    try:
        pushed = _moved(engine.push, code_ref, "push", events)
        if pushed is not None:
            _moved(engine.push, latest_ref, "push", events)
        return pushed
    finally:
        for ref in refs:
            engine.remove(ref)
