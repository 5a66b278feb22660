"""The public surface is small and deliberate; the client never pulls in the docker SDK."""

from __future__ import annotations

import subprocess
import sys

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
    from celery import Celery

    assert isinstance(pfbuild.worker.app, Celery)  # what `celery -A pfbuild.worker` finds
    assert "pfbuild.build" in pfbuild.worker.app.tasks


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
