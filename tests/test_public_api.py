"""The public surface is small and deliberate; the client never pulls in the docker SDK."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pfbuild.client
import pfbuild.worker


def test_client_exports() -> None:
    assert sorted(pfbuild.client.__all__) == sorted(
        ["BadRequest", "BuildAnswer", "BuildClient", "BuildFailed", "BuildJob", "BuildRequest",
         "BuildTimeout", "EngineUnavailable", "ErrorInfo", "FailureInfo", "JobCancelled",
         "JobState", "JobStatus", "JobTimeout", "LockLost", "Manifest", "PfbuildError",
         "Profile", "ProfileRefused", "QueueUnavailable", "Settings", "parse_profile"]
    )
    for name in pfbuild.client.__all__:
        assert getattr(pfbuild.client, name) is not None


def test_worker_exports() -> None:
    assert sorted(pfbuild.worker.__all__) == ["DockerEngine", "Engine", "app",
                                              "resolve_request", "run_build"]
    code = ("import pfbuild.worker, celery; app = pfbuild.worker.app; "
            "assert isinstance(app, celery.Celery) and 'pfbuild.build' in app.tasks")
    env = {**os.environ, "PFBUILD_REDIS_URL": "redis://127.0.0.1:1/0"}
    # what `celery -A pfbuild.worker` finds (in a child: the app reads the environment)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def test_client_never_imports_the_worker() -> None:
    client_dir = Path(pfbuild.client.__file__).parent
    offenders = []
    for path in client_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("pfbuild.worker")]
    assert offenders == []
    code = ("import sys, pfbuild.client, pfbuild.client.cli, pfbuild.client.jobs; "
            "bad = [m for m in sys.modules if m.startswith('pfbuild.worker')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_client_does_not_import_docker() -> None:
    code = ("import sys, pfbuild.client, pfbuild.client.cli; "
            "bad = [m for m in sys.modules if m == 'docker' or m.startswith('docker.')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_error_has_a_distinct_type_and_round_trips() -> None:
    from pfbuild.client import errors

    classes = [getattr(errors, n) for n in errors.__all__ if n != "ExitCode"]
    assert len({c.type for c in classes}) == len(classes)
    for cls in classes:
        assert issubclass(cls, errors.PfbuildError)
        again = errors.PfbuildError.from_info(cls("boom").to_info())
        assert type(again) is cls and again.message == "boom"
