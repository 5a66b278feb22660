"""The pipeline against the real Docker engine: real builds, real reuse, real failures."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import docker
import pytest

from pfbuild.client.errors import BuildFailed
from pfbuild.client.models import BuildRequest, FailureClass
from pfbuild.client.settings import Settings
from tests.fakes import drop_image, run_request

pytestmark = pytest.mark.docker


def _profile(repo: Path, **change: object) -> dict[str, object]:
    doc = json.loads((repo / "repo_profile.json").read_text())
    # a nonce keeps each test's image its own, so reuse is never an accident of other runs
    doc["env"]["PFTEST_NONCE"] = uuid.uuid4().hex
    doc.update(change)
    return doc  # type: ignore[no-any-return]


def test_build_reuse_and_tarball_reload(docker_engine, hello_repo: Path, settings: Settings,
                                        cleanup_images: list[str]) -> None:  # type: ignore[no-untyped-def]
    profile = _profile(hello_repo)
    profile["install_cmds"] = [*profile["install_cmds"], "pip install pytest==8.3.3"]  # type: ignore[misc]
    request = BuildRequest(repo_dir=str(hello_repo), profile=profile)
    built = run_request(request, settings, docker_engine)
    cleanup_images.append(built.image_tag)
    assert built.cache_source == "built" and built.build_variant == "standard"
    assert built.timings.build > 0 and built.timings.save > 0
    log = Path(built.build_log_path).read_text()
    assert "Step 1/" in log and "Successfully tagged" in log

    # the image's env is the profile's, byte for byte, and the repo's own tests pass in it
    client = docker.from_env()
    env = dict(e.split("=", 1) for e in client.images.get(built.image_tag).attrs["Config"]["Env"])
    assert env["HELLO_GREETING"] == 'hello "$USER" \\ world'
    out = client.containers.run(built.image_tag, "python -m pytest -q -p no:cacheprovider",
                                remove=True)
    assert b"1 passed" in out

    local = run_request(request, settings, docker_engine)
    assert (local.cache_source, local.reused_cache, local.image_id) == ("local", True,
                                                                         built.image_id)
    drop_image(docker_engine, built.image_tag)
    assert docker_engine.inspect(built.image_tag) is None
    reloaded = run_request(request, settings, docker_engine)
    assert reloaded.cache_source == "tarball" and reloaded.image_id == built.image_id
    assert reloaded.timings.load > 0 and reloaded.build_variant == "standard"

    # a corrupted tarball is set aside and the image is built again, on the real engine
    drop_image(docker_engine, built.image_tag)
    tarball = Path(built.manifest.tarball.path)  # type: ignore[union-attr]
    with open(tarball, "r+b") as fh:
        fh.seek(tarball.stat().st_size // 2)
        fh.write(b"\0" * 4096)
    rebuilt = run_request(request, settings, docker_engine)
    assert rebuilt.cache_source == "built"
    assert any("rejected" in e and "sha256 mismatch" in e for e in rebuilt.manifest.events)
    assert len(list((tarball.parent / "quarantine").iterdir())) >= 1
    assert tarball.exists()  # saved anew


def test_artifacts_do_not_invalidate_the_copy_layer(docker_engine, hello_repo: Path,
                                                    settings: Settings,
                                                    cleanup_images: list[str]) -> None:  # type: ignore[no-untyped-def]
    first = run_request(BuildRequest(repo_dir=str(hello_repo), profile=_profile(hello_repo)),
                      settings, docker_engine)
    cleanup_images.append(first.image_tag)
    assert (hello_repo / ".pf_manifest").is_dir()  # pfbuild wrote into the repo...
    second = run_request(BuildRequest(repo_dir=str(hello_repo), profile=_profile(hello_repo)),
                       settings, docker_engine)
    cleanup_images.append(second.image_tag)
    log = Path(second.build_log_path).read_text().splitlines()
    copy = next(i for i, ln in enumerate(log) if ln.startswith("Step") and "COPY . /workspace" in ln)
    assert "Using cache" in log[copy + 1]  # ...and the context, hence COPY, did not change


def test_failure_is_classified_from_the_real_log(docker_engine, hello_repo: Path,
                                                 settings: Settings) -> None:  # type: ignore[no-untyped-def]
    profile = _profile(hello_repo, install_cmds=["pip install -r does-not-exist.txt"])
    with pytest.raises(BuildFailed) as info:
        run_request(BuildRequest(repo_dir=str(hello_repo), profile=profile), settings,
                  docker_engine)
    failure = info.value.failure
    assert failure is not None
    assert failure.failure_class is FailureClass.MISSING_INSTALL_MECHANISM
    assert "does-not-exist.txt" in Path(info.value.build_log_path or "").read_text()
    registry = json.loads((hello_repo / ".pf_manifest/unsupported_registry.json").read_text())
    assert any(e["failure_class"] == "missing_install_mechanism"
               for e in registry["entries"].values())


def test_missing_headers_climb_to_the_builder_tier(docker_engine, hello_repo: Path,
                                                   settings: Settings,
                                                   cleanup_images: list[str]) -> None:  # type: ignore[no-untyped-def]
    # fails like a C extension without Python.h, unless the builder tier's headers exist
    probe = ("test -e /usr/include/python3.11/Python.h || "
             "{ echo 'x.c:1:10: fatal error: Python.h: No such file or directory'; exit 1; }")
    profile = _profile(hello_repo, install_cmds=[probe])
    answer = run_request(BuildRequest(repo_dir=str(hello_repo), profile=profile), settings,
                       docker_engine)
    cleanup_images.append(answer.image_tag)
    assert [(a.variant, a.ok) for a in answer.attempts] == [("standard", False),
                                                            ("builder", True)]
    assert answer.build_variant == "builder"
    assert "python3-dev" in Path(answer.dockerfile_path).read_text()
