"""The shared registry under a budget, on the real registry (`bash .ci/hosts.sh`)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis
import requests

from pfbuild.client.queue import Keys
from pfbuild.client.settings import Settings
from pfbuild.worker.engine import BuildSpec
from pfbuild.worker.ops.registrygc import RegistryCollector
from tests.conftest import BASE_IMAGE
from tests.fakes import dockerfile_context

pytestmark = pytest.mark.docker


def _push(engine: Any, settings: Settings, profile_id: str) -> None:
    """A tiny image of ``profile_id`` in the registry, as the registry tier leaves it."""
    dockerfile = f"FROM {BASE_IMAGE}\nLABEL pfgctest.profile={profile_id}\n"
    buf = dockerfile_context(dockerfile)
    ref = settings.registry_ref(profile_id)
    assert ref is not None
    lines: list[str] = []
    assert engine.build(buf, BuildSpec(tag=ref, dockerfile="Dockerfile"), lines.append).ok, lines
    try:
        assert engine.push(ref).digest.startswith("sha256:")
    finally:
        engine.remove(ref)


def _served(settings: Settings, profile_id: str) -> bool:
    reply = requests.head(
        f"http://{settings.registry}/v2/{settings.image_repository}/{profile_id}/manifests/latest",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"}, timeout=30)
    return reply.status_code == 200


def test_the_registry_keeps_the_most_recently_used_profiles(
        docker_engine, registry_addr: str, url: str) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(host_id="gc-reg", registry=registry_addr, gc_max_registry_images=2,
                        image_repository=f"pfgcreg{uuid.uuid4().hex[:10]}")
    profiles = ["p0", "p1", "p2", "p3", "p4"]
    for p in profiles:
        _push(docker_engine, settings, p)
    r = redis.Redis.from_url(url)
    past = time.time() - 100
    for i, p in enumerate(profiles):  # used in order, on two hosts: the latest use counts
        r.zadd(Keys.uses("host-a" if i % 2 else "host-b"), {p: past + i})
    r.zadd(Keys.uses("host-b"), {"p1": past + 50})  # a recent hit on another host
    r.set(Keys.lock("p0"), "someone")  # the least recent, but a build holds it

    collector = RegistryCollector(settings, r)
    assert collector.profiles() == profiles
    assert collector.run(dry_run=True) == ["p2", "p3", "p4"]
    assert all(_served(settings, p) for p in profiles)  # a dry run deletes nothing

    # over by three, least recently used first; p0 is older but locked, p1 was just used
    assert collector.run() == ["p2", "p3", "p4"]
    assert [p for p in profiles if _served(settings, p)] == ["p0", "p1"]
    for p in ("p0", "p1"):  # leave the shared test registry as it was
        assert collector.evict(p)
