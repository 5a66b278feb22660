"""The registry tier against fake engines that share a fake registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pfbuild.client.models import BuildRequest
from pfbuild.client.settings import Settings
from tests.fakes import FakeEngine, FakeRegistry
from tests.fakes import run_request as run_build

REGISTRY = "registry.test:5000"


@pytest.fixture
def repo(hello_repo: Path) -> Path:
    return hello_repo


def _req(repo: Path, **kw: object) -> BuildRequest:
    return BuildRequest.model_validate(
        {"repo_dir": str(repo), "profile_path": str(repo / "repo_profile.json"), **kw}
    )


def test_built_on_one_host_is_pulled_on_the_other(repo: Path, settings: Settings,
                                                 tmp_path: Path) -> None:
    reg = FakeRegistry()
    a, b = FakeEngine(reg), FakeEngine(reg)
    on_a = settings.model_copy(update={"registry": REGISTRY})
    # host B has its own disk: A's tarball is not there
    on_b = on_a.model_copy(update={"tmp_dir": tmp_path / "b-tmp", "host_id": "b"})
    repo_b = tmp_path / "repo-b"
    shutil.copytree(repo, repo_b)

    built = run_build(_req(repo), on_a, a)
    # pushed under its code tag, then as :latest
    assert built.cache_source == "built" and reg.pushes == 2
    code = built.context_sha256[:12]
    ref = f"{REGISTRY}/patchfoundry/{built.profile_id}:{code}"
    assert built.image_tag == f"patchfoundry/{built.profile_id}:{code}"
    assert set(reg.images) == {ref, f"{REGISTRY}/patchfoundry/{built.profile_id}:latest"}
    assert built.manifest.registry is not None and built.manifest.registry.reference == ref
    assert built.manifest.tarball is not None  # the tarball tier stays on by default
    latest = on_a.image_tag(built.profile_id)
    # the registry tags are dropped
    assert set(a.tags("patchfoundry")) == {built.image_tag, latest}

    fetched = run_build(_req(repo_b), on_b, b)
    assert fetched.cache_source == "registry" and fetched.reused_cache
    assert b.builds == [] and b.loads == 0
    assert fetched.image_id == built.image_id
    assert fetched.manifest.registry == built.manifest.registry  # pulled by its code tag
    assert set(b.tags("patchfoundry")) == {built.image_tag, latest}
    on_disk = json.loads(Path(fetched.manifest_path).read_text())
    assert on_disk["registry"]["digest"] == built.manifest.registry.digest


def test_registry_comes_before_the_tarball_and_off_means_no_tarball(
    repo: Path, settings: Settings
) -> None:
    reg = FakeRegistry()
    engine = FakeEngine(reg)
    s = settings.model_copy(update={"registry": REGISTRY, "tarball_cache": False})
    built = run_build(_req(repo), s, engine)
    assert built.manifest.tarball is None and reg.pushes == 2
    assert not list((settings.tmp_dir or Path()).glob("image-cache/*.tar.zst"))
    engine.images.clear()
    again = run_build(_req(repo), s, engine)
    assert again.cache_source == "registry" and engine.loads == 0 and len(engine.builds) == 1


def test_a_registry_that_fails_falls_back_to_tarball_then_build(
    repo: Path, settings: Settings
) -> None:
    reg = FakeRegistry()
    engine = FakeEngine(reg)
    s = settings.model_copy(update={"registry": REGISTRY})
    reg.down = True
    built = run_build(_req(repo), s, engine)
    assert built.cache_source == "built" and built.manifest.registry is None
    assert any("push" in e and "failed" in e for e in built.manifest.events)
    engine.images.clear()
    again = run_build(_req(repo), s, engine)
    assert again.cache_source == "tarball"
    assert any("pull" in e and "failed" in e for e in again.manifest.events)


def test_force_rebuild_skips_the_registry(repo: Path, settings: Settings) -> None:
    reg = FakeRegistry()
    engine = FakeEngine(reg)
    s = settings.model_copy(update={"registry": REGISTRY})
    run_build(_req(repo), s, engine)
    forced = run_build(_req(repo, force_rebuild=True), s, engine)
    assert forced.cache_source == "built" and reg.pulls == 0 and reg.pushes == 4


def test_no_registry_means_no_registry_calls(repo: Path, settings: Settings) -> None:
    reg = FakeRegistry()
    engine = FakeEngine(reg)
    answer = run_build(_req(repo), settings, engine)
    assert answer.manifest.registry is None and reg.pushes == 0
    assert settings.registry_ref("x") is None


def test_a_pull_of_other_code_falls_back_to_latest_and_seeds_the_build(
    repo: Path, settings: Settings, tmp_path: Path
) -> None:
    """A host that lacks the code's image pulls its code tag; without one (pushed before
    code tags, or other code), ``:latest``, whose layers seed the build."""
    reg = FakeRegistry()
    a, b = FakeEngine(reg), FakeEngine(reg)
    s = settings.model_copy(update={"registry": REGISTRY, "tarball_cache": False})
    built = run_build(_req(repo), s, a)
    (repo / "edited.txt").write_text("other code")
    edited = run_build(_req(repo), s.model_copy(update={"host_id": "b"}), b)
    assert edited.cache_source == "built" and edited.image_id != built.image_id
    assert any("registry image" in e and "context changed" in e for e in edited.manifest.events)
    # B holds both codes' images now, each under its own code tag
    assert b.images[built.image_tag].id == built.image_id
    assert b.images[edited.image_tag].id == edited.image_id
