"""`pfbuild build`: the seed's stdin → stdout contract, with named exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pfbuild.client.errors import BadRequest, ExitCode, PfbuildError
from pfbuild.client.models import ErrorInfo


def _run(stdin: str, **env: str) -> tuple[int, dict[str, object], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pfbuild.client.cli", "build"],
        input=stdin, capture_output=True, text=True, env={**os.environ, **env}, timeout=600,
    )
    return proc.returncode, json.loads(proc.stdout), proc.stderr


@pytest.mark.parametrize(
    ("stdin", "says"),
    [
        ("not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"repo_dir": "."}', "profile_path"),
        ('{"repo_dir": ".", "profile": {}, "force_rebuild": "yes"}', "force_rebuild"),
        ('{"repo_dir": ".", "profile": {}, "surprise": 1}', "surprise"),
        ('{"repo_dir": 5, "profile": {}}', "repo_dir"),
        ('{"repo_dir": ".", "profile_path": "/nonexistent/profile.json"}', "does not exist"),
    ],
)
def test_bad_requests_exit_2_with_a_json_error(stdin: str, says: str) -> None:
    code, out, stderr = _run(stdin)
    assert code == ExitCode.BAD_REQUEST
    error = out["error"]
    assert isinstance(error, dict)
    assert isinstance(PfbuildError.from_info(ErrorInfo.model_validate(error)), BadRequest)
    assert says in error["message"] and "Traceback" not in stderr


def test_engine_unavailable_exit_4(hello_repo: Path) -> None:
    req = {"repo_dir": str(hello_repo), "profile_path": str(hello_repo / "repo_profile.json")}
    code, out, _ = _run(json.dumps(req), DOCKER_HOST="unix:///nonexistent/docker.sock")
    assert code == ExitCode.ENGINE_UNAVAILABLE
    assert out["error"]["type"] == "engine_unavailable"  # type: ignore[index]


@pytest.mark.docker
def test_build_and_failure_through_the_cli(docker_engine, hello_repo: Path) -> None:  # type: ignore[no-untyped-def]
    req = {"repo_dir": str(hello_repo), "profile_path": str(hello_repo / "repo_profile.json")}
    code, out, _ = _run(json.dumps(req))
    assert code == ExitCode.OK
    for field in ("image_tag", "profile_id", "reused_cache", "build_log_path", "cache_source",
                  "image_id", "manifest", "manifest_path", "timings", "attempts"):
        assert field in out
    assert docker_engine.inspect(out["image_tag"]).id == out["image_id"]

    bad = {"repo_dir": str(hello_repo),
           "profile": {"install_cmds": ["pip install pkg-resources==0.0.0"]}}
    code, out, _ = _run(json.dumps(bad))
    assert code == ExitCode.BUILD_FAILED
    error = out["error"]
    assert error["type"] == "build_failed"  # type: ignore[index]
    assert error["failure"]["failure_class"] == "invalid_requirement"  # type: ignore[index]
    assert Path(error["build_log_path"]).is_file()  # type: ignore[index]
