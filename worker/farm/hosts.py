"""A worker's host in the farm's registry of hosts (keys in ``pfbuild.client.hosts``).

:func:`install` adds, to a worker's Celery app:

- a queue of the host's own, ``pfbuild.host.{host_id}``, consumed next to the shared one;
- a heartbeat thread in the worker's main process: every ``heartbeat_seconds`` it renews
  the host's heartbeat (expiring after ``host_ttl``), pings the engine (``engine_ok``, and
  ``engine_seen`` when it last answered: a host whose engine is down is routed nothing),
  re-reads which profiles' images the engine holds (so an image removed by hand is
  forgotten within one beat), and moves the jobs of any dead host's queue back to the
  shared queue; while its engine does not answer and another host's does, the worker
  stops taking jobs from the shared queue (:meth:`HostAgent.steer`);
- signal handlers that keep the host's running jobs, and record the image a job left in
  the engine (built, loaded or pulled) at once rather than at the next beat.

Jobs a dead host had *taken* from its own queue (prefetched or running, unacked) are
moved back too; a host that was only cut off from Redis and comes back may then finish
a job another host also runs, which the per-profile lock turns into a cache hit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import docker
import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from kombu.entity import Queue

from pfbuild.client.errors import EngineUnavailable
from pfbuild.client.hosts import HOSTS, HostKeys, held_code, host_queue, list_hosts
from pfbuild.client.queue import QUEUE
from pfbuild.client.redisconn import connect
from pfbuild.client.settings import LATEST, Settings, is_code
from pfbuild.worker.engine import DockerEngine, Engine

__all__ = ["HostAgent", "install", "rescue"]

log = logging.getLogger(__name__)

# kombu's Redis transport keeps delivered, unacked messages here (its defaults)
_UNACKED = "unacked"
_UNACKED_INDEX = "unacked_index"

# seconds a beat's ping waits for the engine: an engine that takes longer is down for
# routing (its jobs would wait as long), and the beat must not outlast the host's TTL
_PING_TIMEOUT = 3.0


def _retarget(raw: bytes | str) -> str:
    """A message as it should sit in the shared queue, so that a lock retry or a later
    redelivery of it goes there too, not back to the dead host's queue. The exchange must
    stay the anonymous one: with a named exchange, each lock retry of the job was
    published more than once, and the copies multiplied."""
    payload: dict[str, Any] = json.loads(raw)
    info = payload.setdefault("properties", {}).setdefault("delivery_info", {})
    info.update(exchange="", routing_key=QUEUE)  # as kombu sends to a named queue
    payload.setdefault("headers", {})["redelivered"] = True
    return json.dumps(payload)


def rescue(client: redis.Redis, dead_host: str, grace: float = 5.0) -> int:
    """Move the jobs of ``dead_host``'s queue, waiting or taken, to the shared queue.

    Taken jobs are the unacked messages of its queue delivered before it went silent
    (its last beat + ``grace``): one delivered later is a live host's, running it now.
    Each message moves in one transaction (WATCH/MULTI), so two live hosts rescuing at
    once move it once, and a crash mid-way loses nothing. Returns how many moved.
    """
    queue, moved = host_queue(dead_host), 0
    last_seen = client.get(HostKeys.last_seen(dead_host))
    cutoff = float(last_seen) + grace if last_seen is not None else None
    while True:
        with client.pipeline() as pipe:
            try:
                pipe.watch(queue)  # type: ignore[no-untyped-call]
                raw = pipe.lindex(queue, -1)  # the oldest: kombu pushes left, pops right
                if raw is None:
                    break
                pipe.multi()
                pipe.rpop(queue)
                pipe.rpush(QUEUE, _retarget(raw))  # consumed next: it has waited longest
                pipe.execute()
                moved += 1
            except redis.WatchError:
                continue
    for tag, entry in client.hscan_iter(_UNACKED):
        message, _exchange, routing_key = json.loads(entry)
        if routing_key != queue or cutoff is None:
            continue
        delivered = client.zscore(_UNACKED_INDEX, tag)
        if delivered is None or delivered > cutoff:
            continue
        with client.pipeline() as pipe:
            try:
                pipe.watch(_UNACKED)  # type: ignore[no-untyped-call]
                if pipe.hget(_UNACKED, tag) is None:
                    continue  # acked or restored meanwhile
                pipe.multi()
                pipe.hdel(_UNACKED, tag)
                pipe.zrem(_UNACKED_INDEX, tag)
                pipe.rpush(QUEUE, _retarget(json.dumps(message)))
                pipe.execute()
                moved += 1
            except redis.WatchError:
                continue
    if moved:
        client.delete(HostKeys.jobs(dead_host))  # they run elsewhere now
    return moved


class HostAgent:
    """The heartbeat thread of one worker's host."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        engine: Callable[[], Engine],
        *,
        node: str,
        queues: list[str],
        concurrency: int,
        consume_shared: Callable[[bool], None] = lambda on: None,
        image_events: Callable[[], Iterable[Any]] | None = None,
    ) -> None:
        self.settings = settings
        self.consume_shared = consume_shared
        self.taking_shared = True  # a worker starts consuming the shared queue
        self.client = client
        self.engine = engine
        self.host_id = settings.host_id
        self.info: dict[str, Any] = {
            "host_id": self.host_id,
            "docker_host": settings.docker_host_name(),
            "node": node,
            "queues": queues,
            "concurrency": concurrency,
            "pid": os.getpid(),
            "started_at": time.time(),
        }
        self.engine_ok: bool | None = None
        self.engine_seen: float | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pfbuild-heartbeat", daemon=True)
        # what the engine holds is read and written by one thread at a time
        self.held_lock = threading.Lock()
        self.image_events = image_events
        # without a stream to follow (unit tests), the beat's reading is all there is
        self.following = threading.Event()
        if image_events is None:
            self.following.set()

    def start(self) -> None:
        try:
            self.beat()  # registered before the first job can be routed here
        finally:
            self.thread.start()  # a first beat that failed is tried again by the next
            if self.image_events is not None:
                threading.Thread(
                    target=self._follow_images, name="pfbuild-host-images", daemon=True
                ).start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(self.settings.heartbeat_seconds + 5)
        # leaving cleanly: say so now, rather than after host_ttl
        with contextlib.suppress(redis.RedisError):
            self.client.delete(HostKeys.heartbeat(self.host_id))

    def _run(self) -> None:
        while not self.stopped.wait(self.settings.heartbeat_seconds):
            try:
                self.beat()
                self.steer()
                self.rescue_dead()
            except Exception as exc:  # a Redis or engine blip: try again next beat
                log.warning("host %s: heartbeat failed: %s", self.host_id, exc)

    def held(self) -> tuple[set[str], dict[str, str]]:
        """The profiles whose images the engine holds (under ``:latest`` or a code tag),
        and its code tags (``{profile_id}:{code}``), each with the image id it names."""
        prefix = f"{self.settings.image_repository}/"
        profiles, codes = set(), {}
        for tag, image_id in self.engine().tagged(self.settings.image_repository).items():
            profile_id, _, name = tag[len(prefix) :].rpartition(":")
            if name == LATEST or is_code(name):
                profiles.add(profile_id)
            if is_code(name):
                codes[held_code(profile_id, name)] = image_id
        return profiles, codes

    def held_profiles(self) -> set[str]:
        return self.held()[0]

    def read_engine(self) -> tuple[bool, tuple[set[str], dict[str, str]]]:
        """Whether the engine answers, and what it holds (:meth:`held`)."""
        try:
            if self.engine().ping(timeout=_PING_TIMEOUT):
                return True, self.held()
        except EngineUnavailable:  # not even a connection (it is made again next beat)
            pass
        return False, (set(), {})

    def beat(self) -> None:
        with self.held_lock:  # no older read of the engine is written over a newer one
            ok, held = self.read_engine()
            self._beat(ok, held)

    def _beat(self, ok: bool, held: tuple[set[str], dict[str, str]]) -> None:
        profiles, codes = held
        now = time.time()
        if ok != self.engine_ok:
            level = logging.INFO if ok else logging.WARNING
            log.log(level, "host %s: engine at %s %s", self.host_id, self.info["docker_host"],
                    "answers" if ok else "does not answer: no job is routed here until it does")
        self.engine_ok = ok
        self.engine_seen = now if ok else self.engine_seen
        beat = {**self.info, "last_seen": now, "engine_ok": ok, "engine_seen": self.engine_seen}
        pipe = self.client.pipeline(transaction=True)
        pipe.sadd(HOSTS, self.host_id)
        pipe.set(HostKeys.last_seen(self.host_id), now)
        pipe.set(HostKeys.heartbeat(self.host_id), json.dumps(beat), ex=self.settings.host_ttl)
        self._write_held(pipe, profiles, codes)
        pipe.execute()

    def _write_held(self, pipe: Any, profiles: set[str], codes: dict[str, str]) -> None:
        """What the engine holds, on ``pipe``. The codes (what clients answer hits from,
        client/hits.py) only while the image events are followed: without them an image
        removed by hand would be answered as held until the next beat."""
        key, codes_key = HostKeys.images(self.host_id), HostKeys.codes(self.host_id)
        pipe.delete(key, codes_key)
        if profiles:
            pipe.sadd(key, *sorted(profiles))
        if codes and self.following.is_set():
            pipe.hset(codes_key, mapping=codes)

    def refresh_held(self) -> None:
        """Read again what the engine holds and record it now (an image event came)."""
        with self.held_lock:
            ok, (profiles, codes) = self.read_engine()
            pipe = self.client.pipeline(transaction=True)
            self._write_held(pipe, profiles if ok else set(), codes if ok else {})
            pipe.execute()

    def _follow_images(self) -> None:
        """Record what the engine holds at each of its image events (tag, untag, delete,
        load, pull, by anyone); while the stream is down, record no codes at all."""
        assert self.image_events is not None
        while not self.stopped.is_set():
            try:
                stream = self.image_events()
                self.following.set()
                self.refresh_held()
                for _event in stream:
                    self.refresh_held()
                    if self.stopped.is_set():
                        break
            except Exception as exc:  # engine gone or restarting: no codes until it is back
                log.debug("host %s: image events ended: %s", self.host_id, exc)
            self.following.clear()
            with contextlib.suppress(Exception):
                self.refresh_held()
            self.stopped.wait(1.0)

    def steer(self) -> None:
        """Take jobs from the shared queue only while this engine answers, or while no other
        host's does (a job taken here then fails at once, as on a farm of one host). Jobs
        already taken, and those of the host's own queue, are handed back (farm/handback.py)."""
        want = self.engine_ok is not False or not any(
            h.routable and h.host_id != self.host_id
            for h in list_hosts(self.client, with_images=False)
        )
        if want == self.taking_shared:
            return
        self.consume_shared(want)
        self.taking_shared = want
        log.warning("host %s: %s the shared queue", self.host_id,
                    "takes jobs from" if want else "engine down: stops taking jobs from")

    def rescue_dead(self) -> None:
        for host in list_hosts(self.client, with_images=False):
            if host.alive or host.host_id == self.host_id:
                continue
            moved = rescue(self.client, host.host_id, grace=self.settings.heartbeat_seconds)
            if moved:
                log.warning("host %s is dead: moved %d job(s) to %s", host.host_id, moved, QUEUE)


def install(app: Celery, settings: Settings) -> None:
    """Give a worker app its host queue, heartbeat and job records (see the module doc)."""
    queues = [QUEUE, host_queue(settings.host_id)]
    app.conf.task_queues = [Queue(name) for name in queues]  # type: ignore[no-untyped-call]
    client = _per_process_redis(app, settings)
    local: dict[str, HostAgent] = {}

    def on_ready(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            local["agent"] = _start_agent(app, settings, client(), sender, queues)

    def on_shutdown(**_: Any) -> None:
        agent = local.pop("agent", None)
        if agent is not None:
            agent.stop()

    # weak=False: the handlers are closures that nothing else holds
    worker_ready.connect(on_ready, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
    # the host's running jobs and the images its jobs left are recorded with the rest of
    # a job's records (worker/farm/farmstate.py)


def _per_process_redis(app: Celery, settings: Settings) -> Callable[[], redis.Redis]:
    """One client per process: the heartbeat runs in the main process, tasks in pool
    children (a connection does not survive a fork)."""
    local: dict[str, Any] = {}

    def client() -> redis.Redis:
        if local.get("pid") != os.getpid():
            client = connect(
                app.conf.broker_url, settings, socket_timeout=settings.worker_redis_socket_timeout
            )
            local.update(pid=os.getpid(), redis=client)
        return local["redis"]  # type: ignore[no-any-return]

    return client


def _start_agent(
    app: Celery, settings: Settings, client: redis.Redis, consumer: Any, queues: list[str]
) -> HostAgent:
    engine: dict[str, Engine] = {}
    node = str(getattr(consumer, "hostname", "") or settings.host_id)

    def consume_shared(on: bool) -> None:
        # through the worker's remote control: its consumer changes its queues in its own
        # loop (kombu's consumer is not for this thread to touch)
        change = app.control.add_consumer if on else app.control.cancel_consumer
        change(QUEUE, destination=[node])

    def get_engine() -> Engine:
        if "e" not in engine:
            engine["e"] = DockerEngine(settings.docker_host_name(), timeout=30)
        return engine["e"]

    def image_events() -> Iterable[Any]:
        # a client of its own: the stream holds its connection for as long as it runs
        api = docker.APIClient(base_url=settings.docker_host_name(), version="auto", timeout=None)
        api.trust_env = False
        return api.events(decode=True, filters={"type": "image"})  # type: ignore[no-any-return]

    agent = HostAgent(
        settings,
        client,
        get_engine,
        node=node,
        queues=queues,
        concurrency=int(getattr(getattr(consumer, "controller", None), "concurrency", 0) or 0),
        consume_shared=consume_shared,
        image_events=image_events,
    )
    try:
        agent.start()
    except Exception as exc:  # the farm still works without it: unrouted
        log.warning("host %s: could not register: %s", settings.host_id, exc)
    return agent
