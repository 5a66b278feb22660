"""Benchmarks that print ratios measured side by side in one run .

Timings on these shared machines are noisy, so each figure is a ratio against a baseline
measured in the same run, and each measurement runs in a fresh child process so that its
peak memory (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from celery import Celery

from pfbuild.client.jobs import BuildClient
from pfbuild.client.profile import validate_request
from pfbuild.client.queue import PING_TASK, QUEUE, Keys
from pfbuild.client.settings import Settings
from pfbuild.worker.bench.localfarm import RedisServer, Worker
from pfbuild.worker.build.context import scan_context
from pfbuild.worker.build.resolve import resolve_request
from pfbuild.worker.caches import tarball
from pfbuild.worker.caches.trust import TrustStore
from pfbuild.worker.engine import engine_from_settings
from pfbuild.worker.layout import EXCLUDED_FROM_CONTEXT
from pfbuild.worker.pipeline import run_build

__all__ = ["digest_bench", "queue_bench", "tarball_bench"]

Row = dict[str, Any]


def _child(fn: Callable[[], Any], out: Any) -> None:
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    out.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def _measure(fn: Callable[[], Any]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of ``fn`` run in a forked child."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, out))
    proc.start()
    result = out.get()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"benchmark step failed (exit {proc.exitcode})")
    return result  # type: ignore[no-any-return]


def _idle() -> None:
    pass


def _tarball_round(settings: Settings, tag: str, work: Path) -> Row:
    """One round: save and load with the docker CLI and with pfbuild, side by side."""
    # each child opens its own connection: sockets do not survive a fork cleanly
    plain, zst = work / "plain.tar", work / "bench.tar.zst"
    trust = TrustStore(work / "trust")
    engine = engine_from_settings(settings)
    cli_save, _ = _measure(
        lambda: subprocess.run(["docker", "save", "-o", str(plain), tag], check=True)
    )
    ours_save, save_rss = _measure(
        lambda: tarball.save_tarball(
            engine_from_settings(settings),
            tag,
            work,
            "bench",
            level=settings.zstd_level,
            threads=settings.zstd_threads,
            trust=trust,
        )
    )
    engine.remove(tag)
    cli_load, _ = _measure(
        lambda: subprocess.run(
            ["docker", "load", "-q", "-i", str(plain)], check=True, stdout=subprocess.DEVNULL
        )
    )
    engine.remove(tag)
    ours_load, load_rss = _measure(
        lambda: tarball.load_tarball(engine_from_settings(settings), zst, tag, trust=trust)
    )
    if engine.inspect(tag) is None:
        raise SystemExit("the benchmark's load did not restore the image")
    return {
        "image_bytes": plain.stat().st_size,
        "zstd_bytes": zst.stat().st_size,
        "size_ratio": zst.stat().st_size / plain.stat().st_size,
        "docker_save_s": cli_save,
        "pfbuild_save_s": ours_save,
        "save_ratio": ours_save / cli_save,
        "docker_load_s": cli_load,
        "pfbuild_load_s": ours_load,
        "load_ratio": ours_load / cli_load,
        "save_peak_rss_mb": save_rss / 2**20,
        "load_peak_rss_mb": load_rss / 2**20,
    }


def tarball_bench(settings: Settings, tag: str, rounds: int = 2) -> list[Row]:
    """pfbuild's zstd save/load against the ``docker save``/``docker load`` command line."""
    if engine_from_settings(settings).inspect(tag) is None:
        raise SystemExit(f"{tag} is not in the engine; build it first")
    idle_rss = _measure(_idle)[1]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="pfbuild-bench-") as tmp:
        for i in range(rounds):
            row = _tarball_round(settings, tag, Path(tmp))
            rows.append({"round": i + 1, **row, "idle_rss_mb": idle_rss / 2**20})
    return rows


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _ratio_row(measure: str, baseline: list[float], ours: list[float], goal: str) -> Row:
    """Medians of both sides, measured in one run, and their ratio."""
    base, mine = _median(baseline), _median(ours)
    return {
        "measure": measure,
        "baseline_s": base,
        "pfbuild_s": mine,
        "ratio": mine / base,
        "goal": goal,
    }


def _nonce_profile(repo: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((repo / "repo_profile.json").read_text())
    doc.setdefault("env", {})["PFBUILD_BENCH_NONCE"] = uuid.uuid4().hex
    return doc


class _BenchFarm:
    """A redis-server and a celery worker of the benchmark's own, and a client on them."""

    def __init__(self, settings: Settings, repo: Path, client: BuildClient, work: Path) -> None:
        self.settings = settings
        self.repo = repo
        self.client = client
        self.work = work
        self.tags: list[str] = []

    def request(self, **kw: Any) -> dict[str, Any]:
        """A request for a profile no earlier run has built."""
        return {"repo_dir": str(self.repo), "profile": _nonce_profile(self.repo), **kw}


@contextmanager
def _bench_farm(settings: Settings, repo: Path) -> Iterator[_BenchFarm]:

    with tempfile.TemporaryDirectory(prefix="pfbuild-qbench-") as tmp:
        work = Path(tmp)
        copy = work / "repo"
        shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(*EXCLUDED_FROM_CONTEXT))
        server = RedisServer(work)
        env = {"PFBUILD_REDIS_URL": server.url, "PFBUILD_TMP_DIR": str(work / "pf-tmp")}
        worker = Worker("bench", env, work, concurrency=2)
        local = settings.model_copy(update={"tmp_dir": work / "pf-tmp"})
        farm: _BenchFarm | None = None
        try:
            worker.wait_ready()
            with BuildClient(server.url, local) as client:
                farm = _BenchFarm(local, copy, client, work)
                yield farm
        finally:
            worker.stop()
            server.stop()
            engine = engine_from_settings(settings)
            for tag in farm.tags if farm else []:
                engine.remove(tag)


def _bare_round_trip(app: Celery) -> float:
    """A trivial task sent and waited for through Celery's stock Redis result backend."""
    start = time.perf_counter()
    app.send_task(PING_TASK).get(timeout=60)
    return time.perf_counter() - start


def _hit_row(farm: _BenchFarm, rounds: int) -> Row:
    """A cache hit through the queue vs a trivial task round trip."""
    hit_req = farm.request()
    farm.tags.append(farm.client.submit(hit_req).result(timeout=1800).image_tag)
    # the baseline: a bare Celery client (stock backend, pub/sub wait) on the same broker
    bare = Celery("bench", broker=farm.client.url, backend=farm.client.url)
    bare.conf.update(task_default_queue=QUEUE, task_serializer="json", result_serializer="json")
    pings, hits = [], []
    for _ in range(rounds):
        pings.append(_bare_round_trip(bare))
        start = time.perf_counter()
        answer = farm.client.submit(hit_req).result(timeout=60)
        hits.append(time.perf_counter() - start)
        assert answer.cache_source == "local"
    return _ratio_row(
        "cache hit via queue (digest checked) / bare Celery round trip", pings, hits, "<= 1.5"
    )


def _build_row(farm: _BenchFarm, builds: int) -> Row:
    """A real build through the queue vs the pipeline called in-process."""
    engine = engine_from_settings(farm.settings)
    direct, queued = [], []
    for _ in range(builds):
        start = time.perf_counter()
        resolved = resolve_request(validate_request(farm.request()), farm.settings)
        d = run_build(resolved, farm.settings, engine)
        direct.append(time.perf_counter() - start)
        start = time.perf_counter()
        q = farm.client.submit(farm.request()).result(timeout=1800)
        queued.append(time.perf_counter() - start)
        farm.tags += [d.image_tag, q.image_tag]
        assert d.cache_source == q.cache_source == "built"
    return _ratio_row("real build via queue / pipeline called directly", direct, queued, "<= 1.1")


def _flight_row(farm: _BenchFarm, submits: int) -> Row:
    """``submits`` concurrent submits of one new profile: builds run, slowest waiter."""
    flight = farm.request()
    done: list[tuple[str, float]] = []

    def one() -> None:
        job = farm.client.submit(flight)
        job.result(timeout=1800)
        done.append((job.id, time.time()))

    threads = [threading.Thread(target=one) for _ in range(submits)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    job_ids = {j for j, _ in done}
    first = next(iter(job_ids))
    finished = farm.client.app.backend.get_task_meta(first)["date_done"]
    finished_ts = (
        finished.timestamp()
        if hasattr(finished, "timestamp")
        else datetime.fromisoformat(str(finished)).timestamp()
    )
    starts = sum(int(farm.client.redis.get(Keys.starts(j)) or 0) for j in job_ids)
    farm.tags.append(farm.client.job(first).result(timeout=5).image_tag)
    return {
        "measure": f"{submits} concurrent submits of one new profile",
        "baseline_s": 0.0,
        "pfbuild_s": max(ts for _, ts in done) - finished_ts,
        "ratio": float(starts),
        "goal": "builds run = 1; pfbuild_s = slowest waiter after the build ended, <= 1",
    }


def digest_bench(megabytes: int = 200, files: int = 2000) -> list[Row]:
    """The context digest's cost per MB of tree: cold (every file read) and warm (stat only)."""
    with tempfile.TemporaryDirectory(prefix="pfbuild-dbench-") as tmp:
        root = Path(tmp)
        chunk = os.urandom(megabytes * 2**20 // files)
        for i in range(files):
            sub = root / f"d{i % 50}"
            sub.mkdir(exist_ok=True)
            (sub / f"f{i}.bin").write_bytes(chunk[: len(chunk) - i % 7] + bytes([i % 251]))
        # a checkout a moment old: files changed within the last seconds are always read
        time.sleep(2.5)
        start = time.perf_counter()
        cold = scan_context(root)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        warm = scan_context(root)
        warm_s = time.perf_counter() - start
        assert cold.digest == warm.digest
        size_mb = cold.bytes / 2**20
    return [
        {
            "measure": f"context digest, {size_mb:.0f} MB in {cold.files} files",
            "cold_s": cold_s,
            "warm_s": warm_s,
            "cold_ms_per_mb": 1000 * cold_s / size_mb,
            "warm_ms_per_mb": 1000 * warm_s / size_mb,
        }
    ]


def queue_bench(
    settings: Settings, repo: Path, rounds: int = 20, builds: int = 2, submits: int = 50
) -> list[Row]:
    """The queue's cost, each figure against its baseline in the same run."""
    with _bench_farm(settings, repo) as farm:
        return [
            _hit_row(farm, rounds),
            _build_row(farm, builds),
            _flight_row(farm, submits),
        ]
