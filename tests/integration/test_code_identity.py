"""A hit holds the code of the repository asked about: on the real engine, every tier
checks the context digest, and single flight never joins two repositories."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pfbuild.client.jobs import BuildClient
from pfbuild.client.models import BuildAnswer, BuildRequest
from pfbuild.client.settings import Settings
from pfbuild.worker.bench.localfarm import RedisServer, Worker
from pfbuild.worker.engine import DockerEngine
from tests.conftest import BASE_IMAGE
from tests.fakes import drop_image, run_request
from tests.hostsupport import index_holds

pytestmark = pytest.mark.docker


def _profile() -> dict[str, Any]:
    # cheap to build: the base and apt layers come from the engine's cache
    return {"install_cmds": ["python -c 'import pathlib; print(pathlib.Path(\"marker.txt\").read_text())'"],
            "env": {"PFTEST_NONCE": uuid.uuid4().hex}}


def _repo(root: Path, name: str, marker: str) -> Path:
    repo = root / name
    repo.mkdir(parents=True)
    (repo / "marker.txt").write_text(marker)
    (repo / ".dockerignore").write_text("scratch/\n")
    (repo / "scratch").mkdir()
    return repo


def _marker_in(image_id: str) -> str:
    # attached, as `docker run` does: the engine's log copy may lag a container's exit
    proc = subprocess.run(["docker", "run", "--rm", image_id, "cat", "/workspace/marker.txt"],
                          capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout


def _build(repo: Path, profile: dict[str, Any], settings: Settings, engine: Any,
           cleanup: list[str]) -> BuildAnswer:
    answer = run_request(BuildRequest(repo_dir=str(repo), profile=profile), settings, engine)
    cleanup.append(answer.image_tag)
    return answer


def test_two_repositories_with_one_profile_get_their_own_code(
        docker_engine, tmp_path: Path, settings: Settings, cleanup_images: list[str]) -> None:  # type: ignore[no-untyped-def]
    profile = _profile()
    a = _build(_repo(tmp_path, "a", "code of A"), profile, settings, docker_engine, cleanup_images)
    b = _build(_repo(tmp_path, "b", "code of B"), profile, settings, docker_engine, cleanup_images)
    assert a.profile_id == b.profile_id and a.image_tag != b.image_tag
    assert (a.cache_source, b.cache_source) == ("built", "built")
    assert a.context_sha256 != b.context_sha256 and a.image_id != b.image_id
    assert any("context changed" in e for e in b.manifest.events)
    assert _marker_in(a.image_id) == "code of A" and _marker_in(b.image_id) == "code of B"
    # each answer's tag names its own code; :latest names the newest build of the profile
    assert a.image_tag == settings.code_tag(a.profile_id, a.context_sha256)
    assert docker_engine.inspect(a.image_tag).id == a.image_id
    assert docker_engine.inspect(b.image_tag).id == b.image_id
    assert docker_engine.inspect(settings.image_tag(a.profile_id)).id == b.image_id
    assert _marker_in(a.image_tag) == "code of A"
    # A again: a hit on its code tag, though :latest names B's image
    again = _build(tmp_path / "a", profile, settings, docker_engine, cleanup_images)
    assert (again.cache_source, again.image_id) == ("local", a.image_id)


def test_an_edit_is_built_and_an_ignored_edit_is_a_hit(
        docker_engine, tmp_path: Path, settings: Settings, cleanup_images: list[str]) -> None:  # type: ignore[no-untyped-def]
    profile, repo = _profile(), _repo(tmp_path, "r", "yesterday")
    first = _build(repo, profile, settings, docker_engine, cleanup_images)
    (repo / "scratch" / "notes.txt").write_text("dockerignored: not in the image")
    ignored = _build(repo, profile, settings, docker_engine, cleanup_images)
    assert (ignored.cache_source, ignored.reused_cache) == ("local", True)
    assert ignored.image_id == first.image_id
    (repo / "marker.txt").write_text("today")
    edited = _build(repo, profile, settings, docker_engine, cleanup_images)
    assert (edited.cache_source, edited.reused_cache) == ("built", False)
    assert _marker_in(edited.image_id) == "today"
    # only the layers from COPY on were rebuilt: the apt layer came from the cache
    log = Path(edited.build_log_path).read_text()
    assert "Using cache" in log.split("COPY . /workspace")[0]


def test_a_tarball_of_other_code_is_not_a_hit(
        docker_engine, tmp_path: Path, settings: Settings, cleanup_images: list[str]) -> None:  # type: ignore[no-untyped-def]
    profile = _profile()
    a = _build(_repo(tmp_path, "a", "code of A"), profile, settings, docker_engine, cleanup_images)
    assert a.manifest.tarball is not None
    drop_image(docker_engine, a.image_tag)  # another host: the image only in the shared tarball
    b = _build(_repo(tmp_path, "b", "code of B"), profile, settings, docker_engine, cleanup_images)
    assert (b.cache_source, b.reused_cache) == ("built", False)
    assert any("tarball image" in e and "context changed" in e for e in b.manifest.events)
    assert _marker_in(b.image_id) == "code of B"


@pytest.fixture
def farm(docker_engine, tmp_path: Path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    server = RedisServer(tmp_path)
    env = {"PFBUILD_REDIS_URL": server.url, "PFBUILD_TMP_DIR": str(tmp_path / "pf-tmp"),
           "PFBUILD_LOCK_POLL_SECONDS": "0.5"}
    worker = Worker("ident", env, tmp_path, concurrency=2)
    try:
        worker.wait_ready()
        yield server.url
    finally:
        worker.stop()
        server.stop()


def test_concurrent_submits_of_two_trees_of_one_profile_name_their_own_images(
        farm: str, tmp_path: Path, cleanup_images: list[str]) -> None:
    profile = _profile()
    repos = {m: _repo(tmp_path, m.replace(" ", "-"), m) for m in ("code of A", "code of B")}
    requests: list[dict[str, Any]] = [
        {"repo_dir": str(repo), "profile": profile} for repo in repos.values()
    ] * 3
    with BuildClient(farm) as client, ThreadPoolExecutor(6) as pool:
        jobs = list(pool.map(client.submit, requests))
        assert len({j.id for j in jobs}) == 2  # one flight per repository, not per profile
        answers = [j.result(timeout=900) for j in jobs]
    cleanup_images.extend(a.image_tag for a in answers)
    assert len({a.image_tag for a in answers}) == 2 and len({a.image_id for a in answers}) == 2
    engine = DockerEngine(Settings().docker_host_name())
    for request, answer in zip(requests, answers, strict=True):
        marker = Path(request["repo_dir"]).joinpath("marker.txt").read_text()
        # checked after both built: each answer's tag still names the image of its tree
        assert engine.inspect(answer.image_tag).id == answer.image_id  # type: ignore[union-attr]
        assert _marker_in(answer.image_tag) == marker
        assert _marker_in(answer.image_id) == marker


def test_a_known_hit_is_answered_by_the_client_until_its_image_or_tree_changes(
        farm: str, tmp_path: Path, cleanup_images: list[str]) -> None:
    profile, repo = _profile(), _repo(tmp_path, "c", "code of C")
    request = {"repo_dir": str(repo), "profile": profile}
    time.sleep(2.5)  # a checkout a moment old: a tree changing this moment is not trusted
    with BuildClient(farm) as client:
        built = client.submit(request).result(timeout=900)
        cleanup_images.append(built.image_tag)
        member = f"{built.profile_id}:{built.image_tag.rpartition(':')[2]}"
        index_holds(farm, member, built.image_id)
        job = client.submit(request)
        hit = job.result(timeout=60)
        assert hit.worker.endswith(":client") and job.status().state.value == "success"
        assert (hit.cache_source, hit.image_id, hit.image_tag) == (
            "local", built.image_id, built.image_tag)

        # the checkout edited: a worker builds it
        (repo / "marker.txt").write_text("code of C, edited")
        edited = client.submit(request).result(timeout=900)
        cleanup_images.append(edited.image_tag)
        assert edited.cache_source == "built" and not edited.worker.endswith(":client")
        assert _marker_in(edited.image_tag) == "code of C, edited"
        time.sleep(2.5)
        client.submit(request).result(timeout=60)  # a worker's hit: the tree is known again
        edited_member = f"{edited.profile_id}:{edited.image_tag.rpartition(':')[2]}"
        index_holds(farm, edited_member, edited.image_id)
        assert client.submit(request).result(timeout=60).worker.endswith(":client")

        # the image removed from the host: never answered as held
        engine = DockerEngine(Settings().docker_host_name())
        drop_image(engine, edited.image_tag)
        index_holds(farm, edited_member, None)
        after = client.submit(request).result(timeout=900)
        assert not after.worker.endswith(":client") and after.cache_source == "tarball"

        # its code tag moved to another image: not answered from the index either
        engine.tag(BASE_IMAGE, edited.image_tag)
        base_id = engine.inspect(BASE_IMAGE).id  # type: ignore[union-attr]
        index_holds(farm, edited_member, base_id)
        again = client.submit(request).result(timeout=60)
        assert not again.worker.endswith(":client") and again.image_id == edited.image_id
        assert engine.inspect(edited.image_tag).id == edited.image_id  # type: ignore[union-attr]
