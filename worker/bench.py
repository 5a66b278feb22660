"""Benchmarks that print ratios measured side by side in one run (SPEC §8).

Timings on these shared machines are noisy, so each figure is a ratio against a baseline
measured in the same run, and each measurement runs in a fresh child process so that its
peak memory (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from pfbuild.client.settings import Settings

__all__ = ["queue_bench", "tarball_bench"]

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


def tarball_bench(settings: Settings, tag: str, rounds: int = 2) -> list[Row]:
    """pfbuild's zstd save/load against the ``docker save``/``docker load`` command line."""
    from pfbuild.worker import cache
    from pfbuild.worker.engine import DockerEngine
    from pfbuild.worker.trust import TrustStore

    def connect() -> DockerEngine:
        # each child opens its own connection: sockets do not survive a fork cleanly
        return DockerEngine(settings.docker_host_name(), timeout=settings.docker_timeout)

    engine = connect()
    if engine.inspect(tag) is None:
        raise SystemExit(f"{tag} is not in the engine; build it first")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="pfbuild-bench-") as tmp:
        work = Path(tmp)
        plain = work / "plain.tar"
        zst = work / "bench.tar.zst"
        trust = TrustStore(work / "trust")
        idle_rss = _measure(_idle)[1]
        for i in range(rounds):
            cli_save, _ = _measure(
                lambda: subprocess.run(["docker", "save", "-o", str(plain), tag], check=True)
            )
            ours_save, save_rss = _measure(
                lambda: cache.save_tarball(
                    connect(),
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
                    ["docker", "load", "-q", "-i", str(plain)],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
            )
            engine.remove(tag)
            ours_load, load_rss = _measure(
                lambda: cache.load_tarball(connect(), zst, tag, trust=trust)
            )
            if engine.inspect(tag) is None:
                raise SystemExit("the benchmark's load did not restore the image")
            rows.append(
                {
                    "round": i + 1,
                    "image_bytes": plain.stat().st_size,
                    "zstd_bytes": zst.stat().st_size,
                    "size_ratio": zst.stat().st_size / plain.stat().st_size,
                    "docker_save_s": cli_save,
                    "pfbuild_save_s": ours_save,
                    "save_ratio": ours_save / cli_save,
                    "docker_load_s": cli_load,
                    "pfbuild_load_s": ours_load,
                    "load_ratio": ours_load / cli_load,
                    "idle_rss_mb": idle_rss / 2**20,
                    "save_peak_rss_mb": save_rss / 2**20,
                    "load_peak_rss_mb": load_rss / 2**20,
                }
            )
    return rows


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _nonce_profile(repo: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((repo / "repo_profile.json").read_text())
    doc.setdefault("env", {})["PFBUILD_BENCH_NONCE"] = uuid.uuid4().hex
    return doc


def queue_bench(
    settings: Settings, repo: Path, rounds: int = 20, builds: int = 2, submits: int = 50
) -> list[Row]:
    """The queue's cost, each figure against its baseline in the same run:

    - a cache hit through the queue vs a trivial Celery task on the same broker;
    - a real build through the queue vs the pipeline called in-process;
    - ``submits`` concurrent submits of one new profile: builds run, slowest waiter.
    """
    from pfbuild.client.jobs import BuildClient, _backoff
    from pfbuild.client.models import BuildRequest
    from pfbuild.client.queue import PING_TASK, Keys
    from pfbuild.worker.engine import DockerEngine
    from pfbuild.worker.localfarm import RedisServer, Worker
    from pfbuild.worker.pipeline import run_build

    rows: list[Row] = []
    tags: list[str] = []
    engine = DockerEngine(settings.docker_host_name(), timeout=settings.docker_timeout)
    with tempfile.TemporaryDirectory(prefix="pfbuild-qbench-") as tmp:
        work = Path(tmp)
        shutil.copytree(
            repo, work / "repo", ignore=shutil.ignore_patterns(".pf_manifest", ".tmp-test")
        )
        repo = work / "repo"
        server = RedisServer(work)
        env = {"PFBUILD_REDIS_URL": server.url, "PFBUILD_TMP_DIR": str(work / "pf-tmp")}
        worker = Worker("bench", env, work, concurrency=2)
        local = settings.model_copy(update={"tmp_dir": work / "pf-tmp"})
        try:
            worker.wait_ready()
            with BuildClient(server.url, local) as client:

                def request(**kw: Any) -> dict[str, Any]:
                    return {"repo_dir": str(repo), "profile": _nonce_profile(repo), **kw}

                # 1. cache hit vs trivial task
                hit_req = request()
                tags.append(client.submit(hit_req).result(timeout=1800).image_tag)
                pings, hits = [], []
                for _ in range(rounds):
                    start = time.perf_counter()
                    ping = client.app.send_task(PING_TASK)
                    for delay in _backoff(0.5):
                        if client.app.backend.get_task_meta(ping.id)["status"] == "SUCCESS":
                            break
                        time.sleep(delay)
                    pings.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    answer = client.submit(hit_req).result(timeout=60)
                    hits.append(time.perf_counter() - start)
                    assert answer.cache_source == "local"
                rows.append(
                    {
                        "measure": "cache hit via queue / trivial task round trip",
                        "baseline_s": _median(pings),
                        "pfbuild_s": _median(hits),
                        "ratio": _median(hits) / _median(pings),
                        "goal": "<= 1.5",
                    }
                )

                # 2. real build via queue vs in-process pipeline
                direct, queued = [], []
                for _ in range(builds):
                    start = time.perf_counter()
                    d = run_build(BuildRequest.model_validate(request()), local, engine)
                    direct.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    q = client.submit(request()).result(timeout=1800)
                    queued.append(time.perf_counter() - start)
                    tags += [d.image_tag, q.image_tag]
                    assert d.cache_source == q.cache_source == "built"
                rows.append(
                    {
                        "measure": "real build via queue / pipeline called directly",
                        "baseline_s": _median(direct),
                        "pfbuild_s": _median(queued),
                        "ratio": _median(queued) / _median(direct),
                        "goal": "<= 1.1",
                    }
                )

                # 3. N concurrent submits of one new profile
                flight = request()
                done: list[tuple[str, float]] = []

                def one() -> None:
                    job = client.submit(flight)
                    job.result(timeout=1800)
                    done.append((job.id, time.time()))

                threads = [threading.Thread(target=one) for _ in range(submits)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                job_ids = {j for j, _ in done}
                meta = client.app.backend.get_task_meta(next(iter(job_ids)))
                finished = meta["date_done"]
                finished_ts = (
                    finished.timestamp()
                    if hasattr(finished, "timestamp")
                    else datetime.fromisoformat(str(finished)).timestamp()
                )
                starts = sum(int(client.redis.get(Keys.starts(j)) or 0) for j in job_ids)
                tags.append(client.job(next(iter(job_ids))).result(timeout=5).image_tag)
                rows.append(
                    {
                        "measure": f"{submits} concurrent submits of one new profile",
                        "baseline_s": 0.0,
                        "pfbuild_s": max(ts for _, ts in done) - finished_ts,
                        "ratio": float(starts),
                        "goal": "builds run = 1; pfbuild_s = slowest waiter after the "
                        "build ended, <= 1",
                    }
                )
        finally:
            worker.stop()
            server.stop()
            for tag in tags:
                engine.remove(tag)
    return rows
