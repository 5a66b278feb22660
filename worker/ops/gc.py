"""Garbage collection under a budget: images, dangling images and tarballs of one host
(docs/design.md, "Garbage collection").

A host keeps at most ``Settings.gc_max_images`` images of its farm's profiles (tagged
``{image_repository}/{profile_id}:latest`` or ``:{code}``: an image is one item, whatever
its tags), evicting the least recently used first: each answer records a use of its
code's image in ``Keys.uses(host)`` (a hit is a use); an image never used through the
queue counts from its creation. Dangling images a rebuild left (they carry
the farm's labels, not its tag) are always collected. Each tarball folder keeps at most
``Settings.gc_max_tarball_bytes``, oldest use (the file's mtime) first; quarantined
tarballs go before any other.

Never removed: an image a container uses (running or stopped), and anything of a profile
that is locked (a build holds it) or has a job in a slot (a hit holds no lock). An
evicted image is simply rebuilt, or loaded from its tarball, next time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import redis

from pfbuild.client.hosts import held_code
from pfbuild.client.queue import Keys
from pfbuild.client.redisconn import connect
from pfbuild.client.settings import Settings, is_code
from pfbuild.worker import layout
from pfbuild.worker.build.ladder import LABEL_PROFILE, LABEL_REPOSITORY
from pfbuild.worker.farm.farmstate import FarmState

__all__ = ["Collector", "GcResult", "Item", "PeriodicGc", "tarball_dirs"]

log = logging.getLogger(__name__)

_DEFAULT_REPOSITORY = Settings.model_fields["image_repository"].default
_TARBALL_SUFFIXES = (".tar.zst", ".tar")


@dataclass
class Item:
    """One thing garbage collection may remove, and what it decided."""

    kind: str  # "image" | "dangling" | "tarball"
    name: str  # tag, image id or path
    profile_id: str | None
    size: int
    last_used: float
    image_id: str | None = None
    tags: list[str] = field(default_factory=list)
    kept: str | None = None  # why it stays although over budget
    paths: list[str] = field(default_factory=list)


@dataclass
class GcResult:
    """What one collection found, removed and kept."""

    host: str
    dry_run: bool
    removed: list[Item] = field(default_factory=list)
    kept: list[Item] = field(default_factory=list)
    images: int = 0
    max_images: int = 0
    tarball_bytes: dict[str, int] = field(default_factory=dict)
    max_tarball_bytes: int = 0
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tarball_dirs(settings: Settings, extra: Iterable[Path] = ()) -> list[Path]:
    """The tarball folders a host collects: the default one, configured ones, ``extra``."""
    dirs = [settings.tmp_dir / layout.CACHE_DIR] if settings.tmp_dir else []
    dirs += [*settings.gc_cache_dirs, *extra]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _tarball_profile(path: Path) -> str | None:
    for suffix in _TARBALL_SUFFIXES:
        if path.name.endswith(suffix):
            return layout.unfenced(path.name[: -len(suffix)])
    return None


class Collector:
    """One collection on one engine (its docker ``APIClient``) with the farm's Redis."""

    def __init__(
        self, api: docker.APIClient, settings: Settings, client: redis.Redis | None
    ) -> None:
        self.api = api
        self.settings = settings
        self.redis = client
        self.host = settings.host_id
        self._tagged: list[Item] = []  # what the last plan found tagged

    # --- what must stay -------------------------------------------------------------
    def busy_profiles(self, profiles: Iterable[str]) -> dict[str, str]:
        """Profiles that must keep everything: locked, or with a job in a slot."""
        if self.redis is None:
            return {}
        busy = {}
        for raw in self.redis.hvals(Keys.running()):
            busy[str(json.loads(raw).get("profile_id"))] = "a job of its profile is running"
        wanted = [p for p in profiles if p not in busy]
        pipe = self.redis.pipeline(transaction=False)
        for profile_id in wanted:
            pipe.exists(Keys.lock(profile_id))
        for profile_id, locked in zip(wanted, pipe.execute(), strict=True):
            if locked:
                busy[profile_id] = "its profile is locked"
        return busy

    def used_by_containers(self) -> set[str]:
        return {str(c.get("ImageID")) for c in self.api.containers(all=True)}

    def uses(self) -> dict[str, float]:
        if self.redis is None:
            return {}
        pairs: list[tuple[Any, float]] = list(
            self.redis.zrange(Keys.uses(self.host), 0, -1, withscores=True)  # type: ignore[arg-type]
        )
        return {(k.decode() if isinstance(k, bytes) else str(k)): float(s) for k, s in pairs}

    # --- images ---------------------------------------------------------------------
    def images(self) -> tuple[list[Item], list[Item]]:
        """This farm's images on the engine: (tagged, dangling)."""
        repo = self.settings.image_repository
        prefix = f"{repo}/"
        uses = self.uses()
        tagged, dangling = [], []
        for img in self.api.images(filters={"label": LABEL_PROFILE}):
            labels = img.get("Labels") or {}
            profile_id = labels.get(LABEL_PROFILE)
            tags = [t for t in img.get("RepoTags") or [] if t != "<none>:<none>"]
            ours = [t for t in tags if t.startswith(prefix) or f"/{prefix}" in t]
            item = Item(
                kind="image",
                name=ours[0] if ours else str(img["Id"]),
                profile_id=profile_id,
                size=int(img.get("Size") or 0),
                last_used=_last_use(uses, profile_id, ours, float(img.get("Created") or 0)),
                image_id=str(img["Id"]),
                tags=ours,
            )
            if ours:
                tagged.append(item)
            elif not tags and labels.get(LABEL_REPOSITORY, _DEFAULT_REPOSITORY) == repo:
                item.kind = "dangling"
                dangling.append(item)
        return tagged, dangling

    def plan_images(self, result: GcResult) -> list[Item]:
        tagged, dangling = self.images()
        self._tagged = tagged
        in_use = self.used_by_containers()
        busy = self.busy_profiles({i.profile_id for i in tagged + dangling if i.profile_id})
        result.images = len(tagged)
        result.max_images = self.settings.gc_max_images
        over = len(tagged) - result.max_images if result.max_images > 0 else 0
        evict = []
        recent = time.time() - self.settings.gc_dangling_grace_seconds
        for item in [*sorted(dangling, key=_lru), *sorted(tagged, key=_lru)]:
            if item.kind == "image" and over <= 0:
                break
            item.kept = busy.get(item.profile_id or "")
            if item.image_id in in_use:
                item.kept = "a container uses it"
            elif item.kind == "dangling" and item.last_used > recent:
                # an agent may still run its gates on the image_id it was answered
                item.kept = item.kept or "its profile was used within the grace period"
            if item.kept:
                result.kept.append(item)
                continue
            evict.append(item)
            over -= item.kind == "image"
        return evict

    def remove_image(self, item: Item) -> bool:
        """Untag each of its tags (the last one deletes it); never forced, so the engine
        refuses if a container started using it meanwhile."""
        try:
            for name in item.tags or [str(item.image_id)]:
                self.api.remove_image(name, force=False)
        except docker.errors.APIError as exc:
            item.kept = f"the engine refused: {exc.explanation or exc}"
            return False
        return True

    # --- tarballs -------------------------------------------------------------------
    def plan_tarballs(self, folder: Path, result: GcResult) -> list[Item]:
        items = []
        quarantine = folder / layout.QUARANTINE_DIR
        for path in [*folder.glob("*"), *(quarantine.glob("*") if quarantine.is_dir() else [])]:
            if not path.is_file() or path.name.endswith(".sha256") or path.name.startswith("."):
                continue
            profile_id = _tarball_profile(path) if path.parent == folder else None
            sidecar = path.with_name(path.name + ".sha256")
            paths = [str(path), *([str(sidecar)] if sidecar.exists() else [])]
            size = sum(Path(p).stat().st_size for p in paths)
            # a quarantined tarball is used by no one: it goes first
            used = path.stat().st_mtime if path.parent == folder else 0.0
            items.append(Item("tarball", str(path), profile_id, size, used, paths=paths))
        total = sum(i.size for i in items)
        result.tarball_bytes[str(folder)] = total
        result.max_tarball_bytes = budget = self.settings.gc_max_tarball_bytes
        busy = self.busy_profiles({i.profile_id for i in items if i.profile_id})
        evict = []
        for item in sorted(items, key=_lru):
            if budget <= 0 or total <= budget:
                break
            item.kept = busy.get(item.profile_id or "")
            if item.kept:
                result.kept.append(item)
                continue
            evict.append(item)
            total -= item.size
        return evict

    # --- the run --------------------------------------------------------------------
    def run(self, *, dry_run: bool = False, extra_dirs: Iterable[Path] = ()) -> GcResult:
        """Collect (or, dry, only say what would go); records what went."""
        result = GcResult(host=self.host, dry_run=dry_run)
        for item in self.plan_images(result):
            if dry_run or self.remove_image(item):
                result.removed.append(item)
            else:
                result.kept.append(item)
        for folder in tarball_dirs(self.settings, extra_dirs):
            if folder.is_dir():
                for item in self.plan_tarballs(folder, result):
                    if not dry_run:
                        for path in item.paths:
                            Path(path).unlink(missing_ok=True)
                    result.removed.append(item)
        if not dry_run:
            self.record(result)
        return result

    def record(self, result: GcResult) -> None:
        """Metrics, the uses and host registry, and the report ``pfbuild top`` shows."""
        from pfbuild.worker.ops.metrics import metrics

        for item in result.removed:
            metrics().gc_removed.labels(item.kind).inc()
            metrics().gc_freed_bytes.labels(item.kind).inc(item.size)
        if self.redis is None:
            return
        removed = [i for i in result.removed if i.kind == "image" and i.profile_id]
        left = {i.profile_id for i in self._tagged if i not in removed}
        gone = sorted({str(i.profile_id) for i in removed} - left)
        codes = [c for i in removed for c in _codes(i)]
        FarmState(self.redis, self.settings).forget_images(gone, codes)
        report = {k: v for k, v in result.to_json().items() if k not in ("removed", "kept")}
        report["removed"] = len(result.removed)
        report["image_bytes"] = self.image_bytes()
        self.redis.set(Keys.gc_report(self.host), json.dumps(report))

    def image_bytes(self) -> int | None:
        """What the engine's layers take on disk (``docker system df``)."""
        try:
            return int(self.api.df().get("LayersSize") or 0)
        except docker.errors.APIError:
            return None


def _lru(item: Item) -> float:
    return item.last_used


def _codes(item: Item) -> list[str]:
    """The code tags of an image item, as named in uses and hosts (``{profile_id}:{code}``)."""
    names = (t.rpartition(":")[2] for t in item.tags)
    return [held_code(item.profile_id, n) for n in names if item.profile_id and is_code(n)]


def _last_use(uses: dict[str, float], profile_id: str | None, tags: list[str], created: float
              ) -> float:
    """When an image was last used: its code's last use; an image with no code tag (built
    before them) the profile's; never used, its creation."""
    codes = [held_code(profile_id or "", t.rpartition(":")[2]) for t in tags
             if is_code(t.rpartition(":")[2])]
    if codes:
        return max([uses.get(c, 0.0) for c in codes]) or created
    return uses.get(profile_id or "", created)


class PeriodicGc:
    """Collects every ``Settings.gc_interval_seconds`` on a thread of the worker's main
    process; one collection per host at a time, however many workers it runs."""

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis = connect(redis_url, settings, socket_timeout=30)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="pfbuild-gc", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _loop(self) -> None:
        interval = self.settings.gc_interval_seconds
        while not self.stopped.wait(interval):
            try:
                self.once(interval)
            except Exception:  # the worker must outlive a failed collection
                log.exception("garbage collection failed")

    def once(self, interval: float) -> GcResult | None:
        from pfbuild.worker.engine import engine_from_settings

        lock = Keys.gc_lock(self.settings.host_id)
        if not self.redis.set(lock, str(time.time()), nx=True, ex=max(1, int(interval))):
            return None  # another worker of this host collected within the interval
        api = engine_from_settings(self.settings).api
        result = Collector(api, self.settings, self.redis).run()
        log.info(
            "gc on %s: removed %d, kept %d over budget",
            self.settings.host_id,
            len(result.removed),
            len(result.kept),
        )
        self.registry_once(interval)
        return result

    def registry_once(self, interval: float) -> None:
        """The shared registry's budget: one host of the farm at a time sees to it."""
        if not (self.settings.registry and self.settings.gc_max_registry_images):
            return
        from pfbuild.worker.ops.registrygc import RegistryCollector

        if self.redis.set(Keys.gc_lock("registry"), "1", nx=True, ex=max(1, int(interval))):
            gone = RegistryCollector(self.settings, self.redis).run()
            log.info("gc of the registry: deleted %d manifests", len(gone))
