"""``pfbuild bench hosts``: the farm on two Docker engines with a registry, in one run.

It starts its own redis-server and one worker per engine, then submits ``profiles``
distinct profiles ``submits`` times each, in rounds of concurrent agents (every profile
once per round), and reports:

- builds per profile, counted from both engines' ``docker events`` (must be 1);
- the share of cache hits answered by a host that already held the image (goal >= 90%);
- publish and fetch seconds per profile for the registry and the tarball tier, each
  fetch measured on the engine that did not build the image;
- the bytes each tier stores for all the profiles (tarballs on disk; the registry's
  distinct blobs, read from its manifests).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pfbuild.client.models import BuildAnswer
from pfbuild.client.settings import Settings
from pfbuild.worker.bench.localfarm import drop_image
from pfbuild.worker.caches import tarball
from pfbuild.worker.engine import DockerEngine

__all__ = ["hosts_bench"]

_LABELS = ("org.pfbuild.profile_id", "org.pfbuild.variant", "org.pfbuild.dockerfile_sha256")
_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


class _Builds:
    """Builds per profile on one engine: the classic builder applies each label in a
    step of its own, and the last one's container carries them all."""

    def __init__(self, engine: DockerEngine) -> None:
        self.counts: Counter[str] = Counter()
        self.stream = engine.api.events(decode=True, filters={"type": "container"})
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                attrs = (event.get("Actor") or {}).get("Attributes") or {}
                if event.get("Action") == "create" and all(k in attrs for k in _LABELS):
                    self.counts[str(attrs[_LABELS[0]])] += 1
        except Exception:
            pass  # closed

    def close(self) -> None:
        self.stream.close()


def _registry_bytes(registry: str, repository: str, profile_ids: list[str]) -> int:
    """The registry's storage for these images: each distinct blob once."""
    blobs: dict[str, int] = {}
    for pid in profile_ids:
        req = urllib.request.Request(
            f"http://{registry}/v2/{repository}/{pid}/manifests/latest",
            headers={"Accept": _MANIFEST_V2},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            manifest = json.loads(resp.read())
        for blob in [manifest["config"], *manifest["layers"]]:
            blobs[blob["digest"]] = int(blob["size"])
    return sum(blobs.values())


def _delete(registry: str, repository: str, answer: BuildAnswer) -> None:
    """Delete the bench's manifest (its blobs wait for the registry's garbage collection)."""
    assert answer.manifest.registry is not None
    url = (
        f"http://{registry}/v2/{repository}/{answer.profile_id}/manifests/"
        f"{answer.manifest.registry.digest}"
    )
    # a registry without delete enabled keeps them
    with contextlib.suppress(OSError):
        urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=30).close()


def _requests(repo: Path, profiles: int) -> list[dict[str, Any]]:
    """``profiles`` distinct profiles of one repository (a nonce in the env of each)."""
    doc = json.loads((repo / "repo_profile.json").read_text())
    nonce = uuid.uuid4().hex[:8]
    requests = []
    for i in range(profiles):
        profile = json.loads(json.dumps(doc))
        profile.setdefault("env", {})["PFBUILD_BENCH_PROFILE"] = f"{nonce}-{i}"
        requests.append({"repo_dir": str(repo), "profile": profile})
    return requests


def _fetch_seconds(
    settings: Settings,
    built: list[BuildAnswer],
    clients: dict[str, DockerEngine],
    work: Path,
    fetches: int,
) -> tuple[list[float], list[float]]:
    """(pull, load) seconds of profiles one host built, fetched in turn on the other
    engine (the first may be cold, the next find the base and apt layers there)."""
    from pfbuild.worker.caches.trust import TrustStore

    builder = Counter(a.docker_host for a in built).most_common(1)[0][0]
    sample = [a for a in built if a.docker_host == builder and a.manifest.tarball][:fetches]
    other = clients["bench-b" if builder == "bench-a" else "bench-a"]
    trust = TrustStore(work / "bench-trust")  # the workers' own records are theirs
    pull_s, load_s = [], []
    for a in sample:
        drop_image(other, a.image_tag)
    for a in sample:
        assert a.manifest.tarball is not None and a.manifest.tarball.sha256
        latest = a.image_tag.rpartition(":")[0] + ":latest"  # what a tarball holds
        trust.record(a.manifest.tarball.sha256, latest, size=a.manifest.tarball.size)
        start = time.perf_counter()
        tarball.load_tarball(other, Path(a.manifest.tarball.path), latest, trust=trust)
        load_s.append(time.perf_counter() - start)
    for a in sample:
        drop_image(other, a.image_tag)
    for a in sample:
        ref = settings.registry_ref(a.profile_id) or ""
        start = time.perf_counter()
        other.pull(ref)
        pull_s.append(time.perf_counter() - start)
        other.remove(ref)
    return pull_s, load_s


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _summary(answers: list[BuildAnswer], counters: dict[str, _Builds]) -> dict[str, Any]:
    built = [a for a in answers if a.cache_source == "built"]
    hits = [a for a in answers if a.cache_source != "built"]
    ids = sorted({a.profile_id for a in answers})
    builds = {p: sum(c.counts[p] for c in counters.values()) for p in ids}
    return {
        "answers": len(answers),
        "builds_per_profile_max": max(builds.values(), default=0),
        "builds_per_profile_min": min(builds.values(), default=0),
        "built_answers": len(built),
        "builds_by_host": {h: sum(c.counts[p] for p in ids) for h, c in counters.items()},
        "hits": len(hits),
        "hits_by_source": dict(Counter(a.cache_source for a in hits)),
        "share_of_hits_on_a_holder": (
            sum(a.cache_source == "local" for a in hits) / len(hits) if hits else 0.0
        ),
        "publish_s_registry_push_median": _median([a.timings.push for a in built]),
        "publish_s_tarball_save_median": _median([a.timings.save for a in built]),
        "bytes_tarballs": sum(a.manifest.tarball.size for a in built if a.manifest.tarball),
    }


def _workers(engines: dict[str, str], common: dict[str, str], work: Path) -> list[Any]:
    """One ``celery worker`` per engine, each its own host."""
    from pfbuild.worker.bench.localfarm import Worker

    workers = []
    for host, url in engines.items():
        env = {**common, "PFBUILD_HOST_ID": host, "DOCKER_HOST": url}
        workers.append(Worker(host, {**env, "PFBUILD_TMP_DIR": str(work / host)}, work, 2))
    for w in workers:
        w.wait_ready()
    time.sleep(2)  # both hosts have beaten
    return workers


def _rounds(
    url: str, settings: Settings, requests: list[dict[str, Any]], submits: int
) -> list[BuildAnswer]:
    """Each round, every profile submitted at once by its own agent; every answer."""
    from pfbuild.client.jobs import BuildClient

    answers: list[BuildAnswer] = []
    with BuildClient(url, settings) as client, ThreadPoolExecutor(2 * len(requests)) as pool:
        for _ in range(submits):
            jobs = list(pool.map(client.submit, requests))
            answers += pool.map(lambda j: j.result(timeout=3600), jobs)
    return answers


def hosts_bench(
    settings: Settings,
    repo: Path,
    *,
    host_b: str,
    registry: str,
    profiles: int = 20,
    submits: int = 10,
    fetches: int = 3,
) -> dict[str, Any]:
    """Run the farm on two engines (see the module docstring); one dict of figures."""
    from pfbuild.worker.bench.localfarm import RedisServer

    engines = {"bench-a": settings.docker_host_name(), "bench-b": host_b}
    clients = {h: DockerEngine(url, timeout=settings.docker_timeout) for h, url in engines.items()}
    answers: list[BuildAnswer] = []
    workers: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="pfbuild-hbench-") as tmp:
        work = Path(tmp)
        shutil.copytree(repo, work / "repo", ignore=shutil.ignore_patterns(".pf_manifest"))
        server = RedisServer(work)
        counters = {h: _Builds(e) for h, e in clients.items()}
        try:
            common = {
                "PFBUILD_REDIS_URL": server.url,
                "PFBUILD_REGISTRY": registry,
                "PFBUILD_HEARTBEAT_SECONDS": "1",
                "PFBUILD_HOST_TTL": "5",
            }
            workers = _workers(engines, common, work)
            answers = _rounds(server.url, settings, _requests(work / "repo", profiles), submits)
            time.sleep(1)  # the last events
            result = _summary(answers, counters)
            built = [a for a in answers if a.cache_source == "built"]
            pull_s, load_s = _fetch_seconds(settings, built, clients, work, fetches)
            ids = sorted({a.profile_id for a in answers})
            result["bytes_registry"] = _registry_bytes(registry, settings.image_repository, ids)
        finally:
            for c in counters.values():
                c.close()
            for w in workers:
                w.stop()
            server.stop()
            _cleanup(answers, clients, registry, settings.image_repository)
    return {
        "profiles": profiles,
        "submits_per_profile": submits,
        **result,
        "fetch_s_registry_pull_first": pull_s[0] if pull_s else 0.0,
        "fetch_s_registry_pull_next_median": _median(pull_s[1:]),
        "fetch_s_tarball_load_first": load_s[0] if load_s else 0.0,
        "fetch_s_tarball_load_next_median": _median(load_s[1:]),
    }


def _cleanup(
    answers: list[BuildAnswer], clients: dict[str, DockerEngine], registry: str, repository: str
) -> None:
    """The bench's images leave both engines and the registry (the base stays)."""
    for a in answers:
        for e in clients.values():
            drop_image(e, a.image_tag)
        if a.cache_source == "built" and a.manifest.registry is not None:
            _delete(registry, repository, a)
