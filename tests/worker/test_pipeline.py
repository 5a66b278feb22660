"""The pipeline's control flow, against the fake engine (the real one: test_pipeline_docker)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pfbuild.client.errors import BadRequest, BuildFailed
from pfbuild.client.models import BuildRequest
from pfbuild.client.settings import Settings
from tests.fakes import FakeEngine, run_request

PROFILE = {"python_version_target": "3.7", "install_cmds": ["pip install -e ."], "env": {}}


def _req(repo: Path, **kw: object) -> BuildRequest:
    return BuildRequest.model_validate({"repo_dir": str(repo), "profile": PROFILE, **kw})


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    (r / "setup.py").write_text("")
    return r


def test_build_then_local_then_tarball(repo: Path, settings: Settings) -> None:
    engine = FakeEngine()
    first = run_request(_req(repo), settings, engine)
    assert (first.cache_source, first.reused_cache, len(engine.builds)) == ("built", False, 1)
    assert first.manifest.tarball and Path(first.manifest.tarball.path).exists()
    assert Path(first.manifest.tarball.path).parent == settings.tmp_dir / "image-cache"  # type: ignore[operator]
    second = run_request(_req(repo), settings, engine)
    assert (second.cache_source, second.reused_cache, len(engine.builds)) == ("local", True, 1)
    engine.images.clear()
    third = run_request(_req(repo), settings, engine)
    assert (third.cache_source, engine.loads, len(engine.builds)) == ("tarball", 1, 1)
    manifest = json.loads(Path(third.manifest_path).read_text())
    assert manifest["cache_source"] == "tarball" and manifest["image_id"] == third.image_id


def test_force_rebuild_skips_caches_and_uses_nocache(repo: Path, settings: Settings) -> None:
    engine = FakeEngine()
    run_request(_req(repo), settings, engine)
    forced = run_request(_req(repo, force_rebuild=True), settings, engine)
    assert forced.cache_source == "built" and len(engine.builds) == 2
    assert engine.builds[1]["nocache"] is True
    assert engine.builds[1]["cache_from"] == [settings.image_tag(forced.profile_id)]
    assert engine.builds[0]["cache_from"] == []  # no tag yet: naming it would disable caching


def test_bad_tarball_is_quarantined_and_the_build_goes_on(repo: Path, settings: Settings) -> None:
    engine = FakeEngine()
    answer = run_request(_req(repo), settings, engine)
    engine.images.clear()
    path = Path(answer.manifest.tarball.path)  # type: ignore[union-attr]
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"junk" * 100)
    again = run_request(_req(repo), settings, engine)
    assert again.cache_source == "built" and len(engine.builds) == 2
    assert any("rejected" in e for e in again.manifest.events)
    assert list((path.parent / "quarantine").iterdir())


def test_ladder_records_each_attempt(repo: Path, settings: Settings) -> None:
    engine = FakeEngine()
    engine.build_log = lambda df: (
        [] if "python3-dev" in df else ["fatal error: Python.h: No such file or directory"]
    )
    engine.build_ok = lambda df: "python3-dev" in df
    answer = run_request(_req(repo), settings, engine)
    assert [a.variant for a in answer.attempts] == ["standard", "builder"]
    assert [a.ok for a in answer.attempts] == [False, True]
    assert answer.build_variant == "builder"
    assert Path(answer.dockerfile_path).name == "Dockerfile.builder"
    log = Path(answer.build_log_path).read_text()
    assert "retrying as 'builder'" in log and "Python.h" in log


def test_a_layer_removed_under_a_build_is_built_again_once(repo: Path, settings: Settings) -> None:
    engine = FakeEngine()
    tries: list[str] = []

    def flaky(df: str) -> bool:
        tries.append(df)
        return len(tries) > 1  # the first attempt lost its parent layer

    engine.build_log = lambda df: ([] if len(tries) > 1 else
                                   ["ERROR: unknown parent image ID sha256:0f5bd089f82e"])
    engine.build_ok = flaky
    answer = run_request(_req(repo), settings, engine)
    assert [(a.variant, a.ok) for a in answer.attempts] == [("standard", False), ("standard", True)]
    # twice is not a race: the second loss fails the build
    tries.clear()
    engine.build_ok = lambda df: False
    engine.build_log = lambda df: ["ERROR: unknown parent image ID sha256:0f5bd089f82e"]
    with pytest.raises(BuildFailed) as info:
        run_request(_req(repo, force_rebuild=True), settings, engine)
    assert len(info.value.details["attempts"]) == 2


def test_failure_is_classified_logged_and_counted(repo: Path, settings: Settings) -> None:
    engine = FakeEngine()
    engine.build_log = lambda df: ["ERROR: No matching distribution found for pywin32==306"]
    engine.build_ok = lambda df: False
    for _ in range(2):
        with pytest.raises(BuildFailed) as info:
            run_request(_req(repo), settings, engine)
    err = info.value.to_info()
    assert err.failure and err.failure.failure_class.value == "platform_incompatible_dependency"
    assert err.build_log_path and "pywin32" in Path(err.build_log_path).read_text()
    registry = json.loads((repo / ".pf_manifest" / "unsupported_registry.json").read_text())
    (entry,) = registry["entries"].values()
    assert entry["count"] == 2 and entry["failure_class"] == "platform_incompatible_dependency"
    assert not list((settings.tmp_dir / "image-cache").glob("*.tar*"))  # type: ignore[operator]


def test_two_profiles_in_one_repo_keep_their_own_artifacts(repo: Path, settings: Settings) -> None:
    engine = FakeEngine()
    a = run_request(_req(repo), settings, engine)
    other = {**PROFILE, "install_cmds": ["pip install ."]}
    b = run_request(BuildRequest(repo_dir=str(repo), profile=other), settings, engine)
    assert a.profile_id != b.profile_id
    assert len({a.build_log_path, b.build_log_path}) == 2
    assert len({a.manifest_path, b.manifest_path}) == 2
    assert "pip install -e ." in Path(a.dockerfile_path).read_text()
    assert "pip install ." in Path(b.dockerfile_path).read_text()


def test_build_context_excludes_pfbuild_output(repo: Path, settings: Settings) -> None:
    engine = FakeEngine()
    run_request(_req(repo), settings, engine)  # writes .pf_manifest/... and a build.log
    (repo / ".pf_manifest" / "note.txt").write_text("more of pfbuild's own output")
    run_request(_req(repo, force_rebuild=True), settings, engine)
    assert engine.builds[0]["sources"] == engine.builds[1]["sources"]
    (repo / "setup.py").write_text("# changed")
    run_request(_req(repo, force_rebuild=True), settings, engine)
    assert engine.builds[2]["sources"] != engine.builds[1]["sources"]
    assert not any(str(m).startswith(".pf_manifest") for m in engine.builds[1]["members"])  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"repo_dir": "/nonexistent/repo"}, "does not exist"),
        ({"profile": {**PROFILE, "install_cmds": ["echo\nRUN evil"]}}, "inject"),
        ({"profile": {"profile_id": "../../etc", "profile": PROFILE}}, "invalid profile_id"),
    ],
)
def test_bad_input_changes_nothing(
    repo: Path, settings: Settings, change: dict[str, object], says: str
) -> None:
    engine = FakeEngine()
    before = sorted(p for p in repo.parent.rglob("*"))
    with pytest.raises(BadRequest, match=says):
        run_request(BuildRequest.model_validate({"repo_dir": str(repo), "profile": PROFILE,
                                               **change}), settings, engine)
    assert engine.builds == [] and sorted(p for p in repo.parent.rglob("*")) == before


def test_allowed_roots_refuse_paths_outside(repo: Path, tmp_path: Path) -> None:
    inside = tmp_path / "allowed"
    inside.mkdir()
    s = Settings(allowed_roots=[inside], host_id="h")
    with pytest.raises(BadRequest, match="outside"):
        run_request(_req(repo), s, FakeEngine())
    ok_repo = inside / "r"
    ok_repo.mkdir()
    with pytest.raises(BadRequest, match="image_cache_dir"):
        run_request(_req(ok_repo, image_cache_dir="/etc"), s, FakeEngine())
    link = inside / "escape"
    link.symlink_to(repo)
    with pytest.raises(BadRequest, match="outside"):
        run_request(_req(link), s, FakeEngine())


def test_symlinked_output_folders_are_refused(repo: Path, settings: Settings,
                                              tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (repo / ".pf_manifest").symlink_to(outside)
    with pytest.raises(BadRequest, match="symbolic link"):
        run_request(_req(repo), settings, FakeEngine())
    (repo / ".pf_manifest").unlink()
    (repo / ".tmp-test").symlink_to(outside)
    with pytest.raises(BadRequest, match="symbolic link"):
        run_request(_req(repo), Settings(host_id="h"), FakeEngine())  # default cache in repo
    assert list(outside.iterdir()) == []


def test_interrupted_build_keeps_its_log_but_a_lost_lock_does_not(repo: Path,
                                                                  settings: Settings) -> None:
    from pfbuild.client.errors import EngineUnavailable, LockLost

    for exc, kept in ((EngineUnavailable("engine went away"), True), (LockLost("gone"), False)):
        engine = FakeEngine()

        def boom(dockerfile: str, exc: Exception = exc) -> list[str]:
            raise exc

        engine.build_log = boom
        with pytest.raises(type(exc)):
            run_request(_req(repo, force_rebuild=True), settings, engine)
        logs = list(repo.rglob("build.log"))
        if kept:
            assert logs and "interrupted: EngineUnavailable" in logs[0].read_text()
            logs[0].unlink()
        else:
            assert logs == []
        assert not list(repo.rglob("*.tmp"))


def test_stale_temporary_files_are_swept(repo: Path, settings: Settings) -> None:
    engine = FakeEngine()
    first = run_request(_req(repo), settings, engine)
    art = Path(first.manifest_path).parent
    cache_dir = Path(first.manifest.tarball.path).parent  # type: ignore[union-attr]
    leftovers = [art / ".build.log.dead.tmp",
                 cache_dir / f".{first.profile_id}.tar.zst.dead.tmp"]
    live = art / ".manifest.json.live.tmp"  # as a concurrent run's would be: fresh
    for p in [*leftovers, live]:
        p.write_bytes(b"torn")
    old = time.time() - settings.build_time_limit - 60
    for p in leftovers:
        os.utime(p, (old, old))
    run_request(_req(repo), settings, engine)
    assert not any(p.exists() for p in leftovers)
    assert live.exists()


def test_a_hit_rewrites_the_manifest_only_when_the_image_changed(
        repo: Path, settings: Settings) -> None:
    """The manifest on disk records the image and how it was reached: hits that change
    nothing of it leave the file alone (the answer carries each request's own timings)."""
    from pfbuild.worker.build.resolve import resolve_request
    from pfbuild.worker.pipeline import reuse_local

    engine = FakeEngine()
    built = run_request(_req(repo), settings, engine)
    resolved = resolve_request(_req(repo), settings)
    path = Path(built.manifest_path)
    first_hit = reuse_local(resolved, settings, engine)
    assert first_hit is not None and first_hit.cache_source == "local"
    on_disk = path.stat()
    assert json.loads(path.read_text())["cache_source"] == "local"  # the source changed
    second_hit = reuse_local(resolved, settings, engine, worker="another")
    assert second_hit is not None and second_hit.manifest.worker == "another"
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (on_disk.st_ino, on_disk.st_mtime_ns)
    (repo / "setup.py").write_text("# new code\n")
    rebuilt = run_request(_req(repo), settings, engine)
    assert rebuilt.cache_source == "built"
    third_hit = reuse_local(resolve_request(_req(repo), settings), settings, engine)
    assert third_hit is not None
    written = json.loads(path.read_text())
    assert (written["image_id"], written["cache_source"]) == (rebuilt.image_id, "local")
