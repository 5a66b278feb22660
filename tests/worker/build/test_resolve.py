"""Resolving a request: once, before anything is written; where its files will go."""

from __future__ import annotations

from pathlib import Path

import pytest

from pfbuild.client.errors import BadRequest
from pfbuild.client.models import BuildRequest
from pfbuild.client.settings import Settings
from pfbuild.worker import layout
from pfbuild.worker.build.resolve import resolve_request

PROFILE = {"install_cmds": ["pip install ."]}


def test_default_cache_follows_tmp_dir_else_the_repo(tmp_path: Path) -> None:
    req = BuildRequest(repo_dir=str(tmp_path), profile=PROFILE)
    in_repo = resolve_request(req, Settings(host_id="h"))
    assert in_repo.cache_dir == tmp_path.resolve() / layout.SCRATCH_DIR / layout.CACHE_DIR
    shared = resolve_request(req, Settings(host_id="h", tmp_dir=tmp_path / "t"))
    assert shared.cache_dir == (tmp_path / "t").resolve() / layout.CACHE_DIR
    assert shared.artifacts == layout.artifact_dir(tmp_path.resolve(), shared.profile_id)


def test_nothing_is_written_while_resolving(tmp_path: Path) -> None:
    resolve_request(BuildRequest(repo_dir=str(tmp_path), profile=PROFILE), Settings(host_id="h"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("what", ["missing", "file"])
def test_repo_dir_must_be_a_directory(tmp_path: Path, what: str) -> None:
    repo = tmp_path / "x"
    if what == "file":
        repo.write_text("")
    with pytest.raises(BadRequest, match="does not exist" if what == "missing" else "directory"):
        resolve_request(BuildRequest(repo_dir=str(repo), profile=PROFILE), Settings(host_id="h"))
