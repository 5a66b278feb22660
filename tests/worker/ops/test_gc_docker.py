"""Garbage collection on the real engine: LRU under a budget, what must stay, --dry-run."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pfbuild.client.queue import Keys
from pfbuild.client.settings import Settings
from pfbuild.worker.build.ladder import LABEL_PROFILE, LABEL_REPOSITORY
from pfbuild.worker.ops.gc import Collector
from tests.conftest import BASE_IMAGE
from tests.fakes import dockerfile_context

pytestmark = [pytest.mark.docker]


@pytest.fixture
def gc_settings(tmp_path: Path) -> Settings:
    # a repository of its own: this test's collections see no one else's images
    return Settings(tmp_dir=tmp_path / "pf-tmp", host_id=f"gc-{uuid.uuid4().hex[:8]}",
                    image_repository=f"pfgctest{uuid.uuid4().hex[:10]}", gc_max_images=3,
                    gc_dangling_grace_seconds=0)


@pytest.fixture
def api(docker_engine, gc_settings: Settings) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    yield docker_engine.api
    repo = gc_settings.image_repository
    for c in docker_engine.api.containers(all=True, filters={"label": f"pfgctest={repo}"}):
        docker_engine.api.remove_container(c["Id"], force=True)
    for img in docker_engine.api.images(filters={"label": f"{LABEL_REPOSITORY}={repo}"}):
        docker_engine.api.remove_image(img["Id"], force=True)


def _build(api: Any, settings: Settings, profile_id: str, content: str = "") -> str:
    """A tiny image of ``profile_id`` labelled as the ladder labels its builds."""
    dockerfile = f"FROM {BASE_IMAGE}\nLABEL pfgctest.content={content or profile_id}\n"
    buf = dockerfile_context(dockerfile)
    tag = settings.image_tag(profile_id)
    labels = {LABEL_PROFILE: profile_id, LABEL_REPOSITORY: settings.image_repository}
    for _ in api.build(fileobj=buf, custom_context=True, tag=tag, labels=labels, decode=True,
                       rm=True, forcerm=True):  # leave no step containers behind
        pass
    return str(api.inspect_image(tag)["Id"])


def _use(r: redis.Redis, settings: Settings, profile_id: str, at: float) -> None:
    r.zadd(Keys.uses(settings.host_id), {profile_id: at})


def _tags(api: Any, settings: Settings) -> set[str]:
    prefix = f"{settings.image_repository}/"
    return {t.split("/")[1].split(":")[0] for img in api.images()
            for t in img.get("RepoTags") or [] if t.startswith(prefix)}


def test_a_budget_of_n_images_keeps_the_n_most_recently_used(api, gc_settings: Settings,
                                                             url: str) -> None:
    r = redis.Redis.from_url(url)
    profiles = [f"p{i}" for i in range(6)]  # N + 3 with N = 3
    past = time.time() - 100  # uses in the past, in order, whatever the machine's speed
    for i, p in enumerate(profiles):
        _build(api, gc_settings, p)
        _use(r, gc_settings, p, past + i)
    _use(r, gc_settings, "p0", past + 10)  # a hit on the oldest: now the newest use

    dry = Collector(api, gc_settings, r).run(dry_run=True)
    assert [i.profile_id for i in dry.removed] == ["p1", "p2", "p3"]
    assert _tags(api, gc_settings) == set(profiles)  # --dry-run removes nothing

    result = Collector(api, gc_settings, r).run()
    assert [i.profile_id for i in result.removed] == ["p1", "p2", "p3"]  # least recent first
    assert _tags(api, gc_settings) == {"p0", "p4", "p5"}
    assert r.zscore(Keys.uses(gc_settings.host_id), "p1") is None  # forgotten
    report = json.loads(r.get(Keys.gc_report(gc_settings.host_id)) or "{}")
    assert (report["images"], report["max_images"], report["removed"]) == (6, 3, 3)


def test_what_a_container_or_a_lock_holds_stays_and_dangling_images_go(
        api, gc_settings: Settings, url: str) -> None:
    r = redis.Redis.from_url(url)
    past = time.time() - 100  # uses in the past: a grace of 0 is over for all of them
    for i, p in enumerate(["p0", "p1", "p2", "p3"]):
        _build(api, gc_settings, p)
        _use(r, gc_settings, p, past + i)
    old_p3 = api.inspect_image(gc_settings.image_tag("p3"))["Id"]
    _build(api, gc_settings, "p3", content="rebuilt")  # the old p3 is left dangling
    container = api.create_container(gc_settings.image_tag("p0"), command="sleep 120",
                                     labels={"pfgctest": gc_settings.image_repository})
    api.start(container["Id"])
    r.set(Keys.lock("p1"), "someone")
    r.hset(Keys.running(), "job-x", json.dumps({"profile_id": "other"}))

    graced = gc_settings.model_copy(update={"gc_dangling_grace_seconds": 3600})
    dry = Collector(api, graced, r).run(dry_run=True)
    assert ("dangling", "p3", "its profile was used within the grace period") in [
        (i.kind, i.profile_id, i.kept) for i in dry.kept]

    result = Collector(api, gc_settings, r).run()
    removed = [(i.kind, i.profile_id) for i in result.removed]
    kept = {i.profile_id: i.kept for i in result.kept}
    assert removed == [("dangling", "p3"), ("image", "p2")]  # over by one: p2 may go
    assert kept == {"p0": "a container uses it", "p1": "its profile is locked"}
    assert _tags(api, gc_settings) == {"p0", "p1", "p3"}
    assert old_p3 not in {img["Id"] for img in api.images(all=True)}


class _NoImages:
    """An engine with nothing on it, for the tarball pass alone."""

    def images(self, **_: Any) -> list[Any]:
        return []

    def containers(self, **_: Any) -> list[Any]:
        return []

    def df(self) -> dict[str, Any]:
        return {"LayersSize": 0}


def test_tarballs_are_collected_least_recently_used_first(tmp_path: Path, url: str) -> None:
    settings = Settings(tmp_dir=tmp_path, host_id="gc-tar", gc_max_tarball_bytes=2500)
    cache = tmp_path / "image-cache"
    (cache / "quarantine").mkdir(parents=True)
    now = time.time()
    for i, name in enumerate(["a", "b", "c", "d"]):
        path = cache / f"{name}.tar.zst"
        path.write_bytes(b"x" * 900)
        path.with_name(path.name + ".sha256").write_text("0" * 64)
        os.utime(path, (now + i, now + i))
    (cache / "quarantine" / "e.tar.zst.20260101T000000Z.1").write_bytes(b"x" * 500)
    r = redis.Redis.from_url(url)
    r.set(Keys.lock("a"), "someone")  # the oldest, but locked

    dry = Collector(_NoImages(), settings, r).run(dry_run=True)
    assert len(list(cache.rglob("*"))) == 10  # nothing removed
    result = Collector(_NoImages(), settings, r).run()
    assert [Path(i.name).name for i in dry.removed] == [Path(i.name).name for i in result.removed]
    assert [Path(i.name).name for i in result.removed] == [
        "e.tar.zst.20260101T000000Z.1", "b.tar.zst", "c.tar.zst"]
    assert sorted(p.name for p in cache.glob("*.tar.zst")) == ["a.tar.zst", "d.tar.zst"]
    assert not (cache / "b.tar.zst.sha256").exists()
    assert [i.kept for i in result.kept] == ["its profile is locked"]


def test_pfbuild_gc_dry_run_json(api, gc_settings: Settings, tmp_path: Path, monkeypatch,
                                 capsys) -> None:
    from pfbuild.client.cli import main

    for p in ("p0", "p1"):
        _build(api, gc_settings, p)
        time.sleep(1.1)  # no uses recorded (no Redis): creation times order them
    monkeypatch.delenv("PFBUILD_REDIS_URL", raising=False)
    monkeypatch.setenv("PFBUILD_IMAGE_REPOSITORY", gc_settings.image_repository)
    monkeypatch.setenv("PFBUILD_GC_MAX_IMAGES", "1")
    monkeypatch.setenv("PFBUILD_TMP_DIR", str(tmp_path / "pf"))
    assert main(["gc", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] is True and out["images"] == 2
    assert [i["profile_id"] for i in out["removed"]] == ["p0"]
    assert _tags(api, gc_settings) == {"p0", "p1"}
