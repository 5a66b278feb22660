"""Garbage collection of the shared registry under a budget (docs/design.md, "Garbage
collection").

The registry keeps at most ``Settings.gc_max_registry_images`` profiles' images (a
profile's ``latest`` and each code's tag), the least recently used across the farm going
first: a profile's last use is the latest of
every host's record (``Keys.uses``), or the time its image was pushed if no host has
used it since. Evicting deletes the image's manifest through the registry's HTTP API
(``delete: enabled`` in its config); the layers no manifest names any more are freed by
the registry's own collector, run the documented way while no one pushes:

    docker-registry garbage-collect /etc/docker/registry/config.yml

Never evicted: a profile that is locked or has a job in a slot. An evicted image is
simply built (and pushed) again by the next request that misses everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
import requests

from pfbuild.client.queue import Keys
from pfbuild.client.settings import Settings

__all__ = ["RegistryCollector"]

log = logging.getLogger(__name__)

# the media types a `docker push` from engines of this age stores
_MANIFESTS = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
_TIMEOUT = 30
_PAGE = 1000


class RegistryCollector:
    """Evicts the least recently used profiles' images from the registry."""

    def __init__(self, settings: Settings, client: redis.Redis | None) -> None:
        if not settings.registry:
            raise ValueError("no registry is set (PFBUILD_REGISTRY)")
        self.settings = settings
        self.redis = client
        self.base = f"http://{settings.registry}/v2"
        self.http = requests.Session()
        self.http.trust_env = False  # a registry of the farm is reached directly

    def profiles(self) -> list[str]:
        """The profiles whose images the registry holds."""
        prefix = f"{self.settings.image_repository}/"
        names: list[str] = []
        params: dict[str, Any] = {"n": _PAGE}
        while True:  # the catalog comes a page at a time (the registry caps its size)
            reply = self.http.get(f"{self.base}/_catalog", params=params, timeout=_TIMEOUT)
            reply.raise_for_status()
            page = reply.json().get("repositories") or []
            names += page
            if len(page) < _PAGE or "next" not in reply.links:
                break
            params = {"n": _PAGE, "last": page[-1]}
        return sorted(n[len(prefix) :] for n in names if n.startswith(prefix))

    def last_uses(self) -> dict[str, float]:
        """Each profile's latest use on any host."""
        latest: dict[str, float] = {}
        if self.redis is None:
            return latest
        for key in self.redis.scan_iter(match=Keys.uses("*"), count=500):
            pairs: list[tuple[Any, float]] = list(
                self.redis.zrange(key, 0, -1, withscores=True)  # type: ignore[arg-type]
            )
            for member, score in pairs:
                name = member.decode() if isinstance(member, bytes) else str(member)
                latest[name] = max(latest.get(name, 0.0), float(score))
        return latest

    def busy(self, profiles: list[str]) -> set[str]:
        """Profiles that must stay: locked, or with a job in a slot."""
        if self.redis is None or not profiles:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for profile_id in profiles:
            pipe.exists(Keys.lock(profile_id))
        locked = {p for p, held in zip(profiles, pipe.execute(), strict=True) if held}
        running = self.redis.hvals(Keys.running())
        return locked | {p for p in profiles if any(p.encode() in raw for raw in running)}

    def plan(self) -> tuple[list[str], list[str]]:
        """(to evict, least recently used first; kept although over budget)."""
        budget = self.settings.gc_max_registry_images
        held = self.profiles()
        if not budget or len(held) <= budget:
            return [], []
        uses = self.last_uses()
        ordered = sorted(held, key=lambda p: (uses.get(p, 0.0), p))
        busy = self.busy(held)
        over = len(held) - budget
        evict = [p for p in ordered if p not in busy][:over]
        return evict, sorted(busy & set(ordered[:over]))

    def evict(self, profile_id: str) -> bool:
        """Delete the manifests of every tag of the profile (``latest`` and each code's);
        True when the registry no longer serves any of them."""
        url = f"{self.base}/{self.settings.image_repository}/{profile_id}"
        listed = self.http.get(f"{url}/tags/list", timeout=_TIMEOUT)
        if listed.status_code == 404:
            return True
        listed.raise_for_status()
        digests = set()
        for tag in listed.json().get("tags") or []:
            head = self.http.head(
                f"{url}/manifests/{tag}", headers={"Accept": _MANIFESTS}, timeout=_TIMEOUT
            )
            if head.headers.get("Docker-Content-Digest"):
                digests.add(head.headers["Docker-Content-Digest"])
        ok = True
        for digest in sorted(digests):  # deleting a manifest drops every tag naming it
            gone = self.http.delete(f"{url}/manifests/{digest}", timeout=_TIMEOUT)
            if gone.status_code not in (202, 404):
                log.warning("registry kept %s: HTTP %s %s", profile_id, gone.status_code, gone.text)
                ok = False
        return ok

    def run(self, *, dry_run: bool = False, say: Callable[[str], None] = log.info) -> list[str]:
        """Evict what is over budget (or, dry, only say what would go); what went."""
        evict, kept = self.plan()
        for profile_id in kept:
            say(f"registry: keeping {profile_id} over budget: its profile is busy")
        if dry_run:
            return evict
        return [p for p in evict if self.evict(p)]
