"""The hosts of a farm as Redis knows them, and where a request should run.

Every worker's host (``PFBUILD_HOST_ID``) keeps, in Redis:

- ``pfbuild:host:{id}``: its heartbeat, a JSON object that expires after
  ``Settings.host_ttl`` seconds unless the worker renews it (so a dead host goes quiet);
- ``pfbuild:host:{id}:images``: the profile ids whose images its engine holds (under
  ``:latest`` or a code tag);
- ``pfbuild:host:{id}:codes``: the code tags its engine holds, ``{profile_id}:{code}`` ->
  the image id (read from the engine at each beat and each image event, and only while
  the worker follows those events: what clients answer hits from, ``client/hits.py``);
- ``pfbuild:host:{id}:jobs``: the jobs running there (job id -> profile id);
- and its id in the set ``pfbuild:hosts``, so that a dead host is still listed.

Each host also consumes a queue of its own, ``pfbuild.host.{id}``. :func:`choose_queue`
sends a request to a live host that holds its image (unless builds fill its slots); a
new profile to the host picked by rendezvous hashing on its base image (builds of one
base land where its layers are), unless jobs running, queued or just routed there fill
its slots; else to the shared queue, as when no host is known. A live worker moves
the jobs of a dead host's queue back to the shared queue (``pfbuild.worker.farm.hosts``).

A host whose engine does not answer (its heartbeat says ``engine_ok: false``) is live
but routed nothing, as if it were dead; a job it took anyway (from the shared queue, or
before its heartbeat noticed) is handed to the host :func:`handback_target` names.

Readers only: the worker side writes these keys. Imports no docker SDK.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from typing import Any

import redis
from pydantic import BaseModel, Field

from pfbuild.client.models import BuildRequest
from pfbuild.client.profile import parse_profile
from pfbuild.client.queue import QUEUE
from pfbuild.client.settings import Settings

__all__ = [
    "HOSTS",
    "HostInfo",
    "HostKeys",
    "Router",
    "choose_queue",
    "handback_target",
    "held_code",
    "host_queue",
    "list_hosts",
]

HOSTS = "pfbuild:hosts"


class HostKeys:
    """Redis key names of one host."""

    @staticmethod
    def heartbeat(host_id: str) -> str:
        return f"pfbuild:host:{host_id}"

    @staticmethod
    def images(host_id: str) -> str:
        return f"pfbuild:host:{host_id}:images"

    @staticmethod
    def codes(host_id: str) -> str:
        """Hash: the code tags its engine holds (``{profile_id}:{code}``, :func:`held_code`)
        -> the id of the image each names."""
        return f"pfbuild:host:{host_id}:codes"

    @staticmethod
    def last_seen(host_id: str) -> str:
        """When the host last beat (no TTL: it outlives the heartbeat)."""
        return f"pfbuild:host:{host_id}:last_seen"

    @staticmethod
    def routed(host_id: str) -> str:
        """Jobs routed to the host in the last few seconds (submits race each other)."""
        return f"pfbuild:host:{host_id}:routed"

    @staticmethod
    def jobs(host_id: str) -> str:
        return f"pfbuild:host:{host_id}:jobs"


def held_code(profile_id: str, code: str) -> str:
    """How a code tag ``{image_repository}/{profile_id}:{code}`` is named in a host's codes
    and uses (``Keys.uses``): ``{profile_id}:{code}``."""
    return f"{profile_id}:{code}"


def host_queue(host_id: str) -> str:
    """The queue only ``host_id``'s workers consume."""
    return f"{QUEUE}.host.{host_id}"


class HostInfo(BaseModel):
    """One host, as ``pfbuild hosts`` shows it."""

    host_id: str
    alive: bool
    docker_host: str | None = None
    node: str | None = None
    queues: list[str] = Field(default_factory=list)
    concurrency: int = 0
    last_seen: float | None = None
    seconds_since_seen: float | None = None
    running: dict[str, str] = Field(default_factory=dict)
    queued: int = 0
    images: list[str] = Field(default_factory=list)
    codes: list[str] = Field(default_factory=list)  # "{profile_id}:{code}" tags it holds
    engine_ok: bool | None = None  # None: not reported (a worker older than the field)
    engine_seen: float | None = None  # when its engine last answered a beat's ping

    @property
    def routable(self) -> bool:
        """Live, and its engine answered at its last beat: jobs may be sent there."""
        return self.alive and self.engine_ok is not False

    @property
    def busy(self) -> bool:
        """Every slot taken by jobs running or already waiting in its own queue."""
        return self.concurrency > 0 and len(self.running) + self.queued >= self.concurrency


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def list_hosts(client: redis.Redis, *, with_images: bool = True) -> list[HostInfo]:
    """Every host that ever registered, live or not, sorted by id."""
    ids = sorted(_text(i) for i in client.smembers(HOSTS))
    if not ids:
        return []
    pipe = client.pipeline(transaction=False)
    for host_id in ids:
        pipe.get(HostKeys.heartbeat(host_id))
        pipe.hgetall(HostKeys.jobs(host_id))
        pipe.llen(host_queue(host_id))
        if with_images:
            pipe.smembers(HostKeys.images(host_id))
            pipe.hkeys(HostKeys.codes(host_id))
    replies = pipe.execute()
    step = 5 if with_images else 3
    now = time.time()
    hosts = []
    for i, host_id in enumerate(ids):
        beat, jobs, queued = replies[i * step : i * step + 3]
        images = replies[i * step + 3] if with_images else set()
        codes = replies[i * step + 4] if with_images else set()
        info: dict[str, Any] = json.loads(beat) if beat else {}
        last = info.get("last_seen")
        hosts.append(
            HostInfo(
                host_id=host_id,
                alive=beat is not None,
                docker_host=info.get("docker_host"),
                node=info.get("node"),
                queues=info.get("queues", []),
                concurrency=int(info.get("concurrency", 0)),
                last_seen=last,
                seconds_since_seen=round(now - last, 1) if last else None,
                running={_text(k): _text(v) for k, v in jobs.items()},
                queued=int(queued),
                images=sorted(_text(p) for p in images),
                codes=sorted(_text(c) for c in codes),
                engine_ok=info.get("engine_ok"),
                engine_seen=info.get("engine_seen"),
            )
        )
    return hosts


def _rendezvous(key: str, host_ids: list[str]) -> str:
    """The host with the highest hash of (key, host): stable while hosts come and go."""
    return max(host_ids, key=lambda h: hashlib.sha256(f"{key}\0{h}".encode()).digest())


def choose_queue(
    client: redis.Redis, settings: Settings, request: BuildRequest, profile_id: str
) -> str:
    """The queue ``request`` should go to (see the module docstring); the shared queue
    whenever Redis cannot say better. A client routes through its :class:`Router`,
    which decides the same for fewer round trips."""
    router = Router(client, settings, max_age=0)
    pipe = client.pipeline(transaction=False)
    hosts = router.ask(pipe, profile_id)
    try:
        held = pipe.execute() if hosts else []
    except redis.RedisError:
        return QUEUE
    return router.choose(request, hosts, held)


def _routable(client: redis.Redis, exclude: frozenset[str] = frozenset()) -> list[HostInfo]:
    """The hosts a job may be sent to (live, engine answering), less ``exclude``."""
    return [
        h
        for h in list_hosts(client, with_images=False)
        if h.routable and h.host_id not in exclude
    ]


def _ask_held(pipe: Any, hosts: list[HostInfo], profile_id: str) -> None:
    """Queue on ``pipe`` whether each of ``hosts`` holds ``profile_id``, in their order."""
    for host in hosts:
        pipe.sismember(HostKeys.images(host.host_id), profile_id)


def _choose(
    client: redis.Redis,
    settings: Settings,
    request: BuildRequest,
    live: list[HostInfo],
    held: list[Any],
) -> str:
    """The queue among ``live`` hosts, ``held[i]`` saying whether ``live[i]`` holds the
    image."""
    if not live:
        return QUEUE
    holders = [h for h, h_held in zip(live, held, strict=True) if h_held]
    if holders:
        # A hit takes milliseconds, so hits may queue at a holder; but not behind builds
        # filling its slots: then any host, as a pull from the registry beats waiting.
        free = [h for h in holders if not h.concurrency or len(h.running) < h.concurrency]
        if not free:
            return QUEUE
        # the least loaded; among equals, any: a hit records no running job, so a fixed
        # order would send every hit to the first holder and leave the others idle
        least = min(len(h.running) + h.queued for h in free)
        return host_queue(random.choice(
            [h for h in free if len(h.running) + h.queued == least]).host_id)
    base = QUEUE
    if request.profile is not None:
        base = settings.base_image(parse_profile(request.profile).python_version)
    chosen = _rendezvous(base, sorted(h.host_id for h in live))
    host = next(h for h in live if h.host_id == chosen)
    return QUEUE if host.busy else _claim(client, host)


class Router:
    """Where one client sends its requests, as :func:`choose_queue` decides, for less.

    The live hosts are read at most once every ``max_age`` seconds (a heartbeat lives
    many times longer, and a job sent to a host that just died comes back to the shared
    queue); whether they hold a profile's image is asked in the caller's own round trip
    (:meth:`ask`), so a hit's submit reads nothing more of Redis."""

    def __init__(self, client: redis.Redis, settings: Settings, *, max_age: float = 1.0) -> None:
        self.client = client
        self.settings = settings
        self.max_age = max_age
        self._live: tuple[float, list[HostInfo]] = (-max_age, [])

    def live(self) -> list[HostInfo]:
        """The live hosts, as read less than ``max_age`` seconds ago."""
        read_at, hosts = self._live
        if not self.settings.routing:
            return []
        if time.monotonic() - read_at >= self.max_age:
            try:
                hosts = _routable(self.client)
            except redis.RedisError:
                hosts = []
            self._live = (time.monotonic(), hosts)
        return hosts

    def ask(self, pipe: Any, profile_id: str) -> list[HostInfo]:
        """Queue on ``pipe`` whether each live host holds ``profile_id``; those hosts, in
        the order of the replies."""
        hosts = self.live()
        _ask_held(pipe, hosts, profile_id)
        return hosts

    def choose(self, request: BuildRequest, hosts: list[HostInfo], held: list[Any]) -> str:
        """The queue for ``request``, given :meth:`ask`'s hosts and their replies."""
        try:
            return _choose(self.client, self.settings, request, hosts, held)
        except redis.RedisError:
            return QUEUE


_ROUTED_WINDOW = 3  # seconds a routing decision counts against a host's free slots


def _claim(client: redis.Redis, host: HostInfo) -> str:
    """The host's queue if a slot is still free counting the jobs routed there in the
    last seconds: many agents submitting at once all read the host idle, and would
    otherwise all be sent to it."""
    try:
        pipe = client.pipeline(transaction=True)
        pipe.incr(HostKeys.routed(host.host_id))
        pipe.expire(HostKeys.routed(host.host_id), _ROUTED_WINDOW)
        recent = int(pipe.execute()[0]) - 1
    except redis.RedisError:
        return QUEUE
    taken = len(host.running) + max(host.queued, recent)
    if host.concurrency and taken >= host.concurrency:
        return QUEUE
    return host_queue(host.host_id)


def handback_target(client: redis.Redis, profile_id: str, exclude: set[str]) -> str | None:
    """The host a job should be handed to when the engine of the host that took it does
    not answer: a routable host not in ``exclude`` (the hosts it was already on), one that
    holds the image first, then the least loaded; None if there is none."""
    hosts = _routable(client, frozenset(exclude))
    if not hosts:
        return None
    pipe = client.pipeline(transaction=False)
    _ask_held(pipe, hosts, profile_id)
    held = pipe.execute()
    best = min(
        zip(hosts, held, strict=True),
        key=lambda pair: (not pair[1], len(pair[0].running) + pair[0].queued, pair[0].host_id),
    )
    return best[0].host_id
