"""Benchmarks that print ratios measured side by side in one run (SPEC §8).

Timings on these shared machines are noisy, so each figure is a ratio against a baseline
measured in the same run, and each measurement runs in a fresh child process so that its
peak memory (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import multiprocessing
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pfbuild.client.settings import Settings

__all__ = ["tarball_bench"]

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
            ours_load, load_rss = _measure(lambda: cache.load_tarball(connect(), zst, tag))
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
