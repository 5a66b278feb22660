"""``pfbuild bench agents``: many agents, each with its own checkout, against a bare Celery
task on the same workers, in one run.

It starts its own redis-server and two workers (``-c 2`` each: both on this engine, or one
on each engine with ``host_b``), copies the repository into one checkout per agent, builds
the image once, and then runs rounds that alternate a bare Celery task (the stock Redis
result backend, a result as large as an answer) and pfbuild hits, each round with the same
agents: ``processes`` processes of ``threads`` threads, each thread an agent with its own
client and its own checkout. Each round prints hits (or calls) per second, p50 and p99
latency, and CPU seconds per 1,000 for the workers (every process of both), the agents
and Redis; then the ratio of pfbuild's throughput to the bare task's, round by round.
pfbuild runs twice per round: with every hit answered by a worker (``client_hits`` off),
and as agents run it, a hit the farm already knows answered by the client.

Before its first timed round, every agent makes one hit from its checkout (a checkout's
first hit digests a tree no worker process has seen): the workers' CPU for those is
reported apart, per 1,000 first hits.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pfbuild.client.settings import Settings
from pfbuild.worker.layout import EXCLUDED_FROM_CONTEXT

__all__ = ["agents_bench"]

Row = dict[str, Any]
# the baseline; pfbuild with every hit answered by a worker; pfbuild as agents run it,
# a known hit answered by the client (client/hits.py)
KINDS = ("bare", "pfbuild-worker", "pfbuild")
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_of_groups(pgids: list[int]) -> float:
    """CPU seconds (user + system) of every process in these process groups, now."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # after the name: state ppid pgrp ... utime(12) stime(13) cutime cstime
        if int(fields[2]) in pgids:
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / _TICK


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass(frozen=True)
class _Plan:
    """What every agent process needs, picklable (agents are spawned, not forked)."""

    url: str
    profile: dict[str, Any]
    checkouts: list[str]
    seconds: float
    result_bytes: int


def _bare_agent(plan: _Plan, index: int, warmed: Any, go: Any, out: list[float]) -> None:
    """One agent of the baseline: a stock Celery app, a bare task, its answer-sized result."""
    from celery import Celery

    from pfbuild.client.queue import PING_TASK, QUEUE

    app = Celery(f"bare-{index}", broker=plan.url, backend=plan.url)
    app.conf.update(task_default_queue=QUEUE, task_serializer="json", result_serializer="json")
    app.send_task(PING_TASK, kwargs={"size": plan.result_bytes}).get(timeout=120)  # warm
    warmed.wait()
    go.wait()
    deadline = time.monotonic() + plan.seconds
    while time.monotonic() < deadline:
        start = time.perf_counter()
        app.send_task(PING_TASK, kwargs={"size": plan.result_bytes}).get(timeout=120)
        out.append(time.perf_counter() - start)
    app.close()


def _hit_agent(plan: _Plan, index: int, warmed: Any, go: Any, out: list[float],
               client_hits: bool = True) -> None:
    """One agent of pfbuild: its own client, its own checkout, a hit each time."""
    from pfbuild.client.jobs import BuildClient
    from pfbuild.client.settings import Settings

    request = {"repo_dir": plan.checkouts[index], "profile": plan.profile}
    settings = Settings(client_hits=client_hits)
    with BuildClient(plan.url, settings) as client:
        first = client.submit(request).result(timeout=600)  # its checkout's first hit
        if first.cache_source != "local":
            raise RuntimeError(f"agent {index}: expected a hit, got {first.cache_source}")
        warmed.wait()
        go.wait()
        deadline = time.monotonic() + plan.seconds
        while time.monotonic() < deadline:
            start = time.perf_counter()
            client.submit(request).result(timeout=120)
            out.append(time.perf_counter() - start)


def _agent_process(kind: str, plan: _Plan, indices: list[int], ready: Any, go: Any,
                   out: Any) -> None:
    """``len(indices)`` agents on threads; reports their latencies and this process's CPU
    seconds while they ran timed."""
    # imported once here, before the threads: celery's lazily built module is not safe to
    # import from many threads at once (one may see it half made)
    import celery  # noqa: F401

    import pfbuild.client.jobs  # noqa: F401

    latencies: list[list[float]] = [[] for _ in indices]
    warmed, started = threading.Barrier(len(indices) + 1), threading.Event()
    threads = [
        threading.Thread(
            target=_bare_agent if kind == "bare" else _hit_agent,
            args=(plan, i, warmed, started, latencies[n]),
            kwargs={} if kind == "bare" else {"client_hits": kind == KINDS[2]},
            daemon=True,
        )
        for n, i in enumerate(indices)
    ]
    for t in threads:
        t.start()
    warmed.wait(timeout=900)  # every agent made its first call
    ready.wait(timeout=900)  # so did every other process's
    go.wait()
    cpu = time.process_time()
    started.set()
    for t in threads:
        t.join()
    out.put(([x for lat in latencies for x in lat], time.process_time() - cpu))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


@dataclass
class _Farm:
    url: str
    workers: list[Any]
    redis_pid: int

    def cpu(self) -> tuple[float, float]:
        """(workers' CPU seconds, Redis' CPU seconds) so far."""
        return _cpu_of_groups([w.proc.pid for w in self.workers]), _cpu_of(self.redis_pid)


def _round(kind: str, farm: _Farm, plan: _Plan, processes: int, threads: int) -> Row:
    """One timed round of ``processes`` x ``threads`` agents; its figures."""
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Barrier(processes + 1), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_agent_process,
            args=(kind, plan, list(range(p * threads, (p + 1) * threads)), ready, go, out),
        )
        for p in range(processes)
    ]
    workers_0, _ = farm.cpu()
    for p in procs:
        p.start()
    ready.wait(timeout=900)  # every agent made its first call (a checkout's first hit)
    workers_1, redis_1 = farm.cpu()
    start = time.monotonic()
    go.set()
    results = [out.get(timeout=plan.seconds + 600) for _ in procs]
    wall = time.monotonic() - start
    workers_2, redis_2 = farm.cpu()
    for p in procs:
        p.join(30)
    latencies = [x for lat, _ in results for x in lat]
    n = len(latencies)
    per_1000 = 1000 / n if n else 0.0
    agents = processes * threads
    return {
        "kind": kind,
        "agents": agents,
        "calls": n,
        "per_s": n / wall,
        "p50_s": _percentile(latencies, 0.50),
        "p99_s": _percentile(latencies, 0.99),
        "cpu_workers_per_1000": (workers_2 - workers_1) * per_1000,
        "cpu_agents_per_1000": sum(cpu for _, cpu in results) * per_1000,
        "cpu_redis_per_1000": (redis_2 - redis_1) * per_1000,
        "cpu_workers_per_1000_first": (workers_1 - workers_0) * 1000 / agents,
    }


def _checkouts(repo: Path, root: Path, count: int) -> list[str]:
    """One copy of ``repo`` per agent (the same code, each in its own folder)."""
    paths = []
    for i in range(count):
        dest = root / f"checkout-{i:04d}"
        shutil.copytree(repo, dest, ignore=shutil.ignore_patterns(*EXCLUDED_FROM_CONTEXT))
        paths.append(str(dest))
    # a checkout a moment old: files changed within the last seconds are always read
    time.sleep(2.5)
    return paths


@contextmanager
def _farm(settings: Settings, work: Path, host_b: str | None) -> Iterator[_Farm]:
    """A redis-server and two workers of ``-c 2``: on this engine, or one on each."""
    from pfbuild.worker.bench.localfarm import RedisServer, Worker

    server = RedisServer(work)
    engines = {"agents-a": settings.docker_host_name(), "agents-b": host_b or ""}
    workers = []
    try:
        for host, docker_host in engines.items():
            env = {
                "PFBUILD_REDIS_URL": server.url,
                "PFBUILD_TMP_DIR": str(work / "pf-tmp"),
                "PFBUILD_HOST_ID": host,
                "PFBUILD_METRICS_PORT": "0",
                "PFBUILD_GC_INTERVAL_SECONDS": "0",
                "DOCKER_HOST": docker_host or settings.docker_host_name(),
            }
            workers.append(Worker(host, env, work, concurrency=2))
        for w in workers:
            w.wait_ready()
        time.sleep(1.5)  # both hosts have beaten
        yield _Farm(server.url, workers, server.proc.pid)
    finally:
        for w in workers:
            w.stop()
        server.stop()


def _prepare(settings: Settings, farm: _Farm, repo: Path, checkouts: list[str],
             host_b: str | None) -> tuple[dict[str, Any], int, list[str]]:
    """Build the agents' image once (on each engine); the profile, the answer's size in
    bytes, and the tags to remove afterwards."""
    from pfbuild.client.jobs import BuildClient
    from pfbuild.worker.engine import DockerEngine

    profile: dict[str, Any] = json.loads((repo / "repo_profile.json").read_text())
    profile.setdefault("env", {})["PFBUILD_BENCH_NONCE"] = uuid.uuid4().hex
    with BuildClient(farm.url, settings) as client:
        answer = client.submit({"repo_dir": checkouts[0], "profile": profile}).result(3600)
    tags = [answer.image_tag, settings.image_tag(answer.profile_id)]
    if host_b:  # both engines hold it: every agent's hit is answered where it lands
        here = DockerEngine(settings.docker_host_name())
        there = DockerEngine(host_b)
        there.load(here.save(tags[1]))
        there.tag(tags[1], tags[0])
        time.sleep(settings.heartbeat_seconds + 1)  # B's beat has seen it
    return profile, len(answer.model_dump_json()), tags


def agents_bench(
    settings: Settings,
    repo: Path,
    *,
    processes: int = 8,
    threads: int = 25,
    seconds: float = 20.0,
    rounds: int = 2,
    host_b: str | None = None,
) -> dict[str, Any]:
    """Run the bench (see the module docstring); rounds and ratios."""
    from pfbuild.worker.engine import DockerEngine

    rows: list[Row] = []
    tags: list[str] = []
    size = 0
    with tempfile.TemporaryDirectory(prefix="pfbuild-abench-") as tmp:
        work = Path(tmp)
        checkouts = _checkouts(repo, work, processes * threads)
        try:
            with _farm(settings, work, host_b) as farm:
                profile, size, tags = _prepare(settings, farm, repo, checkouts, host_b)
                plan = _Plan(farm.url, profile, checkouts, seconds, size)
                for _ in range(rounds):
                    for kind in KINDS:
                        rows.append(_round(kind, farm, plan, processes, threads))
        finally:
            for url in filter(None, [settings.docker_host_name(), host_b]):
                engine = DockerEngine(url)
                for tag in tags:
                    engine.remove(tag)
    return {
        "agents": f"{processes} processes x {threads} threads",
        "workers": "2 x -c 2, " + ("one per engine" if host_b else "both on this engine"),
        "seconds_per_round": seconds,
        "answer_bytes": size,
        "rounds": rows,
        **{f"ratio_{kind}": _ratios(rows, kind) for kind in KINDS[1:]},
    }


def _ratios(rows: list[Row], kind: str) -> dict[str, Any]:
    """``kind``'s calls per second over the bare task's, round by round (each against the
    bare round just before it), and their median."""
    pairs = []
    for i, row in enumerate(rows):
        if row["kind"] == kind:
            bare = next(r for r in reversed(rows[:i]) if r["kind"] == "bare")
            pairs.append(row["per_s"] / bare["per_s"])
    return {"per_round": pairs, "median": statistics.median(pairs) if pairs else 0.0}
