"""The embedded default starts no farm (a hit is the pipeline's hit check, a build the
pipeline in the command's process), and answers only a hit of this very code: through the CLI (no PFBUILD_REDIS_URL), the image removed, retagged to another
tree's image, or the checkout edited between submits is never answered as held."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from pfbuild.client.fingerprint import RACY_SECONDS
from tests.client.test_startup import loaded
from tests.fakes import drop_image

pytestmark = pytest.mark.docker

# a broker, a worker or the queue's client: what a hit must not load
FARM = ("celery", "kombu", "fakeredis")


def _repo(root: Path, name: str, marker: str, profile: dict[str, Any]) -> Path:
    repo = root / name
    repo.mkdir()
    (repo / "marker.txt").write_text(marker)
    (repo / "p.json").write_text(json.dumps(profile))
    return repo


def _two_trees(tmp_path: Path) -> tuple[dict[str, Any], Path, Path, dict[str, str]]:
    """One new profile, two trees of it (A's and B's code), and the embedded default's
    environment (no PFBUILD_REDIS_URL, a cache folder of the test's own)."""
    profile = {"install_cmds": ["python -c 'print(open(\"marker.txt\").read())'"],
               "env": {"PFTEST_NONCE": uuid.uuid4().hex}}
    a = _repo(tmp_path, "a", "code of A", profile)
    b = _repo(tmp_path, "b", "code of B", profile)
    env = {k: v for k, v in os.environ.items() if k != "PFBUILD_REDIS_URL"}
    env["PFBUILD_TMP_DIR"] = str(tmp_path / "pf-tmp")
    return profile, a, b, env


def _submit(repo: Path, env: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """`pfbuild submit --wait --json` through the embedded default; the answer, and the
    heavy modules the process loaded."""
    request = json.dumps({"repo_dir": str(repo), "profile_path": str(repo / "p.json")})
    code, out, heavy = loaded("submit", "--wait", "--json", env=env, stdin=request)
    assert code == 0, out
    return json.loads(out), heavy


def _marker_in(image_id: str) -> str:
    proc = subprocess.run(["docker", "run", "--rm", image_id, "cat", "/workspace/marker.txt"],
                          capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout


def _holds(engine: Any, answer: dict[str, Any], marker: str) -> None:
    """The answer names the image its tag names now, built from the tree with ``marker``."""
    info = engine.inspect(answer["image_tag"])
    assert info is not None and info.id == answer["image_id"]
    assert info.labels["org.pfbuild.context_sha256"] == answer["context_sha256"]
    assert _marker_in(answer["image_id"]) == marker


def test_cli_hits_hold_this_code(docker_engine, tmp_path: Path,  # type: ignore[no-untyped-def]
                                 cleanup_images: list[str]) -> None:
    _, a, b, env = _two_trees(tmp_path)

    first, heavy = _submit(a, env)
    cleanup_images.append(first["image_tag"])
    assert first["cache_source"] == "built"
    assert not [m for m in heavy if m.split(".")[0] in FARM]  # built here, no broker

    hit, heavy = _submit(a, env)
    assert hit["cache_source"] == "local" and hit["image_id"] == first["image_id"]
    assert not [m for m in heavy if m.split(".")[0] in FARM]  # no broker, no worker started

    # B's build moves the profile's :latest to B's image; A's own code tag still names A's
    other, _ = _submit(b, env)
    assert other["cache_source"] == "built" and other["image_id"] != first["image_id"]
    assert other["image_tag"] != first["image_tag"]
    again, _ = _submit(a, env)
    assert again["cache_source"] == "local" and again["image_id"] == first["image_id"]
    _holds(docker_engine, again, "code of A")

    # retagged by hand, to an image of the profile with other code
    docker_engine.tag(other["image_id"], first["image_tag"])
    by_hand, _ = _submit(a, env)
    assert by_hand["cache_source"] != "local" and by_hand["image_id"] != other["image_id"]
    _holds(docker_engine, by_hand, "code of A")

    # the checkout edited: a new image with the new code
    (a / "marker.txt").write_text("code of A, edited")
    edited, _ = _submit(a, env)
    assert edited["cache_source"] == "built" and edited["context_sha256"] != by_hand["context_sha256"]
    _holds(docker_engine, edited, "code of A, edited")

    # removed: never answered as held; it comes back from the tarball or a build
    drop_image(docker_engine, edited["image_tag"])  # its code tag and :latest
    back, _ = _submit(a, env)
    assert back["cache_source"] in ("tarball", "built")
    _holds(docker_engine, back, "code of A, edited")
    hit, heavy = _submit(a, env)
    assert hit["cache_source"] == "local" and hit["image_id"] == back["image_id"]
    assert not [m for m in heavy if m.split(".")[0] in FARM]


def test_build_answers_a_hit_without_the_queue(docker_engine, hello_repo: Path,  # type: ignore[no-untyped-def]
                                               tmp_path: Path, cleanup_images: list[str]) -> None:
    """`pfbuild build` on an existing image: the pipeline's hit check, no queue loaded."""
    profile = {"install_cmds": ["true"], "env": {"PFTEST_NONCE": uuid.uuid4().hex}}
    request = json.dumps({"repo_dir": str(hello_repo), "profile": profile})
    env = {"PFBUILD_TMP_DIR": str(tmp_path / "pf-tmp")}
    code, out, _ = loaded("build", env=env, stdin=request)
    assert code == 0, out
    built = json.loads(out)
    cleanup_images.append(built["image_tag"])
    code, out, heavy = loaded("build", env=env, stdin=request)
    assert code == 0, out
    hit = json.loads(out)
    assert hit["cache_source"] == "local" and hit["image_id"] == built["image_id"]
    assert not [m for m in heavy if m.split(".")[0] in FARM]


def _quick(heavy: list[str]) -> bool:
    """Whether the answer came before the command line loaded (client/quickhit.py)."""
    return "typer" not in heavy


def _remember(repo: Path, env: dict[str, str]) -> dict[str, Any]:
    """Hits until one is answered quick: a hit the whole way is remembered once the tree
    is past the racy seconds of its last change and the image's publications (its tarball,
    saved by a process of its own) have landed. The quick answer."""
    time.sleep(RACY_SECONDS + 0.1)
    deadline = time.monotonic() + 600  # a niced save of the whole image, on a loaded machine
    while True:
        answer, heavy = _submit(repo, env)
        assert answer["cache_source"] == "local"
        if _quick(heavy):
            return answer
        assert time.monotonic() < deadline, "a hit of an unchanged checkout is never quick"
        time.sleep(1)


def test_a_repeated_hit_is_answered_before_the_command_line_loads(  # type: ignore[no-untyped-def]
    docker_engine, tmp_path: Path, cleanup_images: list[str]
) -> None:
    """The second hit of one checkout loads neither typer nor pydantic's models (only the
    docker SDK, for one call), and answers only while the image under its code tag is the
    one answered, the tree and the profile file unchanged."""
    profile, a, b, env = _two_trees(tmp_path)

    built, _ = _submit(a, env)
    cleanup_images.append(built["image_tag"])
    first, heavy = _submit(a, env)  # the whole way: a hit
    assert first["cache_source"] == "local" and not _quick(heavy)
    quick = _remember(a, env)
    assert quick["image_id"] == built["image_id"]
    same = ("image_tag", "image_id", "context_sha256", "profile_id", "manifest_path",
            "build_variant", "docker_host")
    assert {k: quick[k] for k in same} == {k: first[k] for k in same}
    _holds(docker_engine, quick, "code of A")
    code, out, heavy = loaded("build", env=env, stdin=json.dumps(
        {"repo_dir": str(a), "profile_path": str(a / "p.json")}))
    assert code == 0 and _quick(heavy) and json.loads(out)["image_id"] == built["image_id"]

    # turned off: the whole way
    off, heavy = _submit(a, {**env, "PFBUILD_CLIENT_HITS": "false"})
    assert off["image_id"] == built["image_id"] and not _quick(heavy)

    # the code tag moved to B's image: not answered quick, nor as held
    other, _ = _submit(b, env)
    cleanup_images.append(other["image_tag"])
    docker_engine.tag(other["image_id"], built["image_tag"])
    moved, heavy = _submit(a, env)
    assert not _quick(heavy) and moved["image_id"] != other["image_id"]
    _holds(docker_engine, moved, "code of A")

    # the profile file rewritten with the same bytes: its stat tells, the whole way
    _remember(a, env)
    (a / "p.json").write_text(json.dumps(profile))
    again, heavy = _submit(a, env)
    assert not _quick(heavy) and again["image_id"] == moved["image_id"]

    # the image removed: the whole way, back from the tarball or a build
    _remember(a, env)
    drop_image(docker_engine, again["image_tag"])
    back, heavy = _submit(a, env)
    assert not _quick(heavy) and back["cache_source"] in ("tarball", "built")
    _holds(docker_engine, back, "code of A")

    # the checkout edited: a new build
    _remember(a, env)
    (a / "marker.txt").write_text("code of A, edited")
    edited, heavy = _submit(a, env)
    assert not _quick(heavy) and edited["cache_source"] == "built"
    _holds(docker_engine, edited, "code of A, edited")
