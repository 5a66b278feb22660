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
from pfbuild.worker import cache
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
    from pfbuild.client.jobs import BuildClient
    from pfbuild.worker.localfarm import RedisServer, Worker

    engines = {"bench-a": settings.docker_host_name(), "bench-b": host_b}
    clients = {h: DockerEngine(url, timeout=settings.docker_timeout) for h, url in engines.items()}
    answers: list[BuildAnswer] = []
    with tempfile.TemporaryDirectory(prefix="pfbuild-hbench-") as tmp:
        work = Path(tmp)
        shutil.copytree(
            repo, work / "repo", ignore=shutil.ignore_patterns(".pf_manifest", ".tmp-test")
        )
        doc = json.loads((work / "repo" / "repo_profile.json").read_text())
        nonce = uuid.uuid4().hex[:8]
        requests = []
        for i in range(profiles):
            profile = json.loads(json.dumps(doc))
            profile.setdefault("env", {})["PFBUILD_BENCH_PROFILE"] = f"{nonce}-{i}"
            requests.append({"repo_dir": str(work / "repo"), "profile": profile})
        server = RedisServer(work)
        common = {
            "PFBUILD_REDIS_URL": server.url,
            "PFBUILD_REGISTRY": registry,
            "PFBUILD_HEARTBEAT_SECONDS": "1",
            "PFBUILD_HOST_TTL": "5",
        }
        workers = [
            Worker(
                h,
                {
                    **common,
                    "PFBUILD_HOST_ID": h,
                    "DOCKER_HOST": url,
                    "PFBUILD_TMP_DIR": str(work / h),
                },
                work,
                concurrency=2,
            )
            for h, url in engines.items()
        ]
        counters = {h: _Builds(e) for h, e in clients.items()}
        try:
            for w in workers:
                w.wait_ready()
            time.sleep(2)  # both hosts have beaten
            with (
                BuildClient(server.url, settings) as client,
                ThreadPoolExecutor(2 * profiles) as pool,
            ):
                for _ in range(submits):  # a round: every profile submitted at once
                    jobs = list(pool.map(client.submit, requests))
                    answers += pool.map(lambda j: j.result(timeout=3600), jobs)
            time.sleep(1)  # the last events
            built = [a for a in answers if a.cache_source == "built"]
            hits = [a for a in answers if a.cache_source != "built"]
            builds = Counter[str]()
            for c in counters.values():
                builds.update(c.counts)
            ids = sorted({a.profile_id for a in answers})

            # publish: what each built profile cost each tier, on the host that built it
            push_s = [a.timings.push for a in built]
            save_s = [a.timings.save for a in built]
            tar_bytes = sum(a.manifest.tarball.size for a in built if a.manifest.tarball)
            # fetch: profiles one host built, in turn, on the other engine (the first is
            # cold, the next ones find the base and apt layers there), once per tier
            by_host = Counter(a.docker_host for a in built)
            builder = by_host.most_common(1)[0][0] if built else "bench-a"
            sample = [a for a in built if a.docker_host == builder][:fetches]
            other = clients["bench-b" if builder == "bench-a" else "bench-a"]
            pull_s, load_s = [], []
            for a in sample:
                other.remove(a.image_tag)
            for a in sample:
                assert a.manifest.tarball is not None
                start = time.perf_counter()
                cache.load_tarball(other, Path(a.manifest.tarball.path), a.image_tag)
                load_s.append(time.perf_counter() - start)
            for a in sample:
                other.remove(a.image_tag)
            for a in sample:
                ref = settings.registry_ref(a.profile_id) or ""
                start = time.perf_counter()
                other.pull(ref)
                pull_s.append(time.perf_counter() - start)
                other.remove(ref)
            reg_bytes = _registry_bytes(registry, settings.image_repository, ids)
        finally:
            for c in counters.values():
                c.close()
            for w in workers:
                w.stop()
            server.stop()
            for a in answers:
                for e in clients.values():
                    e.remove(a.image_tag)
                if a.cache_source == "built" and a.manifest.registry is not None:
                    _delete(registry, settings.image_repository, a)
    return {
        "profiles": profiles,
        "submits_per_profile": submits,
        "answers": len(answers),
        "builds_per_profile_max": max(builds[p] for p in ids) if ids else 0,
        "builds_per_profile_min": min(builds[p] for p in ids) if ids else 0,
        "built_answers": len(built),
        "builds_by_host": {h: sum(c.counts[p] for p in ids) for h, c in counters.items()},
        "hits": len(hits),
        "hits_by_source": dict(Counter(a.cache_source for a in hits)),
        "share_of_hits_on_a_holder": (
            sum(a.cache_source == "local" for a in hits) / len(hits) if hits else 0.0
        ),
        "publish_s_registry_push_median": statistics.median(push_s) if push_s else 0.0,
        "publish_s_tarball_save_median": statistics.median(save_s) if save_s else 0.0,
        "fetch_s_registry_pull_first": pull_s[0] if pull_s else 0.0,
        "fetch_s_registry_pull_next_median": statistics.median(pull_s[1:]) if pull_s[1:] else 0.0,
        "fetch_s_tarball_load_first": load_s[0] if load_s else 0.0,
        "fetch_s_tarball_load_next_median": statistics.median(load_s[1:]) if load_s[1:] else 0.0,
        "bytes_registry": reg_bytes,
        "bytes_tarballs": tar_bytes,
    }
