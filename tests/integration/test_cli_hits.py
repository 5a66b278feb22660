"""The embedded default answers a hit without starting a farm, and only a hit of this very
code: through the CLI (no PFBUILD_REDIS_URL), the image removed, retagged to another
tree's image, or the checkout edited between submits is never answered as held."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

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
    profile = {"install_cmds": ["python -c 'print(open(\"marker.txt\").read())'"],
               "env": {"PFTEST_NONCE": uuid.uuid4().hex}}
    a = _repo(tmp_path, "a", "code of A", profile)
    b = _repo(tmp_path, "b", "code of B", profile)
    env = {k: v for k, v in os.environ.items() if k != "PFBUILD_REDIS_URL"}
    env["PFBUILD_TMP_DIR"] = str(tmp_path / "pf-tmp")

    first, heavy = _submit(a, env)
    cleanup_images.append(first["image_tag"])
    assert first["cache_source"] == "built" and "celery" in heavy  # built through the queue

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
