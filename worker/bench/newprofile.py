"""``pfbuild bench new-profile``: what an agent waits for a profile no one has built,
against a bare ``docker build`` (the classic builder) of the same Dockerfile.

Rounds alternate, in an order rotated from round to round, with a second's pause after
each: a bare build, ``pfbuild submit --wait`` with no Redis (the embedded default, a
process of its own, as an agent runs it), and a submit through a farm of one real worker
with the client library. Each round's profile is new (a nonce env var), so
the base and apt layers come from the engine's cache and the layers from ``ENV`` on are
built, as for a real new profile. After each answer the round waits for the image's
publication to land (the tarball whole, with its sidecar) before the next starts, and
reports how long after the answer it landed. Last, each path's image is removed from
the engine and submitted again: it must come back from its tarball, with the same id.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pfbuild.client.jobs import BuildClient
from pfbuild.client.profile import parse_profile
from pfbuild.client.settings import Settings
from pfbuild.worker.bench.localfarm import RedisServer, Worker, drop_image
from pfbuild.worker.bench.measures import _median, _nonce_profile
from pfbuild.worker.build.render import VARIANTS, render
from pfbuild.worker.engine import engine_from_settings
from pfbuild.worker.layout import EXCLUDED_FROM_CONTEXT

__all__ = ["new_profile_bench"]

Row = dict[str, Any]
_LANDED_WITHIN = 120.0  # seconds after the answer the tarball must be whole


def _bare_build(repo: Path, profile: dict[str, Any], settings: Settings, tag: str) -> float:
    """`docker build` (DOCKER_BUILDKIT=0) of the Dockerfile pfbuild renders for ``profile``."""
    parsed = parse_profile(profile, settings=settings)
    text = render(parsed, VARIANTS["standard"], base_image=settings.base_image(
        parsed.python_version), archive_url=settings.debian_archive_url)
    (repo / "Dockerfile.bare").write_text(text)
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    start = time.perf_counter()
    subprocess.run(["docker", "build", "-q", "-f", "Dockerfile.bare", "-t", tag, "."],
                   cwd=repo, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def _cli_submit(repo: Path, profile: dict[str, Any], cache: Path, python: str) -> tuple[float, Row]:
    """`pfbuild submit --wait --json` with no PFBUILD_REDIS_URL: the embedded default."""
    (repo / "p.json").write_text(json.dumps(profile))
    request = json.dumps({"repo_dir": str(repo), "profile_path": str(repo / "p.json"),
                          "image_cache_dir": str(cache)})
    env = {k: v for k, v in os.environ.items() if k != "PFBUILD_REDIS_URL"}
    start = time.perf_counter()
    # as the console script runs it (pfbuild.client.main:run)
    proc = subprocess.run([python, "-m", "pfbuild.client.main", "submit", "--wait", "--json"],
                          input=request, capture_output=True, text=True, env=env, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"pfbuild submit failed: {proc.stdout} {proc.stderr[-2000:]}")
    answer: Row = json.loads(proc.stdout)
    return took, answer


def _landed(cache: Path, profile_id: str, since: float) -> float:
    """Seconds from ``since`` until the profile's tarball is whole in ``cache`` (its
    sidecar written once it is durable), at most ``_LANDED_WITHIN``; inf if never."""
    from pfbuild.worker.caches.tarball import find_tarball

    while time.perf_counter() - since < _LANDED_WITHIN:
        found = find_tarball(cache, profile_id)
        if found is not None and found.with_name(found.name + ".sha256").exists():
            return time.perf_counter() - since
        time.sleep(0.1)
    return float("inf")


@contextmanager
def _farm(work: Path, python: str) -> Iterator[BuildClient]:
    """A redis-server and one real worker (``python``'s pfbuild), and a client on them."""
    server = RedisServer(work)
    env = {"PFBUILD_REDIS_URL": server.url, "PFBUILD_TMP_DIR": str(work / "farm-tmp"),
           "PFBUILD_METRICS_PORT": "0"}
    worker = Worker("newprofile", env, work, concurrency=1, python=python)
    try:
        worker.wait_ready()
        with BuildClient(server.url) as client:
            yield client
    finally:
        worker.stop()
        server.stop()


# after each measure, the engine settles (a build's or removal's writes reach the disk)
# before the next starts, so none pays for the one before it
_SETTLE = 1.0


def _round(work: Path, repo: Path, settings: Settings, client: BuildClient,
           python: str, turn: int) -> dict[str, float]:
    """One alternation of the bare build, the embedded CLI and the farm, each on a new
    profile, in an order rotated by ``turn``."""
    fig: dict[str, float] = {}

    def bare() -> None:
        tag = f"pfbuild-bench-bare:{os.getpid()}-{time.time_ns()}"
        fig["bare"] = _bare_build(repo, _nonce_profile(repo), settings, tag)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)

    def cli() -> None:
        cache = work / "cli-cache"
        fig["cli"], answer = _cli_submit(repo, _nonce_profile(repo), cache, python)
        fig["cli_job"] = answer["timings"]["total"]  # the rest is the command's own
        fig["cli_landed"] = _landed(cache, answer["profile_id"], time.perf_counter())
        _keep(work, answer["image_tag"])

    def farm() -> None:
        start = time.perf_counter()
        got = client.submit({"repo_dir": str(repo), "profile": _nonce_profile(repo),
                             "image_cache_dir": str(work / "farm-cache")}).result(timeout=1800)
        fig["farm"] = time.perf_counter() - start
        fig["farm_job"] = got.timings.total
        fig["farm_landed"] = _landed(work / "farm-cache", got.profile_id, time.perf_counter())
        _keep(work, got.image_tag)

    order = [bare, cli, farm]
    for measure in order[turn % 3:] + order[:turn % 3]:
        measure()
        time.sleep(_SETTLE)
    return fig


def _keep(work: Path, tag: str) -> None:
    with open(work / "tags", "a") as fh:
        fh.write(tag + "\n")


def _reload(repo: Path, settings: Settings, work: Path, client: BuildClient,
            python: str) -> Row:
    """After `docker rmi`, each path's profile comes back from its tarball, same id."""
    engine = engine_from_settings(settings)
    profile = _nonce_profile(repo)
    cache = work / "reload-cache"
    _, first = _cli_submit(repo, profile, cache, python)
    _landed(cache, first["profile_id"], time.perf_counter())
    drop_image(engine, first["image_tag"])
    _, again = _cli_submit(repo, profile, cache, python)
    request = {"repo_dir": str(repo), "profile": _nonce_profile(repo),
               "image_cache_dir": str(work / "farm-cache")}
    built = client.submit(request).result(timeout=1800)
    _landed(work / "farm-cache", built.profile_id, time.perf_counter())
    drop_image(engine, built.image_tag)
    # the farm's hosts read the removal from their engine's events: milliseconds later
    # (docs/design.md, "What a hit means"); a submit within them may still be a hit
    time.sleep(1.0)
    back = client.submit(request).result(timeout=1800)
    for tag in (first["image_tag"], built.image_tag):
        _keep(work, tag)
    return {"cli_after_rmi": again["cache_source"],
            "cli_same_id": again["image_id"] == first["image_id"],
            "farm_after_rmi": back.cache_source, "farm_same_id": back.image_id == built.image_id}


def _rows(rounds: list[dict[str, float]]) -> list[Row]:
    bare = _median([r["bare"] for r in rounds])
    rows = []
    for key, what, factor, plus in (("cli", "pfbuild submit --wait (embedded default)", 1.2, 0.5),
                                    ("farm", "farm, one worker, client library", 1.1, 0.3)):
        mine = _median([r[key] for r in rounds])
        rows.append({
            "measure": f"new profile: {what} / bare docker build",
            "baseline_s": bare, "pfbuild_s": mine, "ratio": mine / bare,
            "goal": f"<= {factor} x bare + {plus} s = {factor * bare + plus:.2f} s",
            "met": mine <= factor * bare + plus,
            "tarball_landed_after_answer_s": max(r[f"{key}_landed"] for r in rounds),
        })
    return rows


def new_profile_bench(settings: Settings, repo: Path, rounds: int = 5,
                      python: str = sys.executable) -> Row:
    """Medians of ``rounds`` alternating rounds; ``python``: whose pfbuild runs the CLI
    and the worker (another install, to compare two versions on one machine)."""
    with tempfile.TemporaryDirectory(prefix="pfbuild-npbench-") as tmp:
        work = Path(tmp)
        copy = work / "repo"
        shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(*EXCLUDED_FROM_CONTEXT))
        try:
            with _farm(work, python) as client:
                figures = [_round(work, copy, settings, client, python, turn)
                           for turn in range(rounds)]
                reload = _reload(copy, settings, work, client, python)
        finally:
            engine = engine_from_settings(settings)
            tags = (work / "tags").read_text().split() if (work / "tags").exists() else []
            for tag in tags:
                engine.remove(tag)
    return {"rows": _rows(figures), "after_rmi": reload, "rounds": figures, "python": python}
