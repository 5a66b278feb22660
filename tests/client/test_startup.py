"""Start-up is paid for what a command uses: a client command, run in a process of its
own, loads nothing of the worker, the docker SDK or requests (docs/design.md, "Start-up")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pfbuild.client.cli import CLIENT_COMMANDS

# Run the command as the console script does, then say which heavy modules it loaded
# (typer and redis too: a hit answered before the command line loads, client/quickhit.py,
# loads neither).
_RUN = """
import json, sys
from pfbuild.client.main import main
code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules
               if m.split('.')[0] in ('docker', 'requests', 'urllib3', 'fakeredis', 'celery',
                                      'kombu', 'typer', 'redis')
               or m == 'pfbuild.worker' or m.startswith('pfbuild.worker.'))
sys.stderr.write('\\nLOADED ' + json.dumps(heavy) + '\\n')
sys.exit(code)
"""


def loaded(*args: str, env: dict[str, str], stdin: str = "") -> tuple[int, str, list[str]]:
    """Run ``pfbuild ARGS`` in a fresh interpreter: exit code, stdout, and which of the
    heavy modules (the worker's, the docker SDK, requests, urllib3, fakeredis, celery,
    kombu, typer, redis) it loaded."""
    proc = subprocess.run([sys.executable, "-c", _RUN, *args], input=stdin, text=True,
                          capture_output=True, env={**os.environ, **env}, timeout=120)
    marker = proc.stderr.rsplit("\nLOADED ", 1)
    assert len(marker) == 2, proc.stderr
    return proc.returncode, proc.stdout, json.loads(marker[1])


def worker_side(modules: list[str]) -> list[str]:
    """What a client command must not load: the worker, the docker SDK, requests."""
    return [m for m in modules if m.split(".")[0] in ("docker", "requests", "urllib3")
            or m.startswith("pfbuild.worker")]


def test_every_client_command_is_listed() -> None:
    assert {"submit", "status", "wait", "logs", "cancel", "hosts", "top"} == CLIENT_COMMANDS


def test_client_commands_load_no_worker_docker_or_requests(url: str, tmp_path: Path) -> None:
    """Each client command against a farm's Redis (fakeredis over TCP: no worker answers,
    so the job stays queued): it runs its whole path and imports no worker module."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "p.json").write_text(json.dumps({"install_cmds": ["true"]}))
    env = {"PFBUILD_REDIS_URL": url}
    code, out, heavy = loaded("submit", "--json", "--repo-dir", str(repo),
                              "--profile", str(repo / "p.json"), env=env)
    assert code == 0, out
    assert worker_side(heavy) == []
    job = json.loads(out)["job_id"]
    for args, exit_code in [(("status", job), 0), (("wait", job, "--json", "--timeout", "0.2"), 6),
                            (("logs", job), 0), (("hosts", "--json"), 0), (("top", "--json"), 0),
                            (("cancel", job), 0)]:
        code, out, heavy = loaded(*args, env=env)
        assert code == exit_code, (args, out)
        assert worker_side(heavy) == [], args


def test_a_worker_command_does_load_the_worker() -> None:
    """The check above can see a worker module load: `pfbuild build` loads the pipeline."""
    code, out, heavy = loaded("build", env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
                              stdin=json.dumps({"repo_dir": ".", "profile": {"install_cmds": ["true"]}}))
    assert code == 4, out  # the engine does not answer
    assert "pfbuild.worker.pipeline" in heavy and "docker" in heavy


@pytest.mark.parametrize("argv", [["submit", "--wait"], ["--help"], ["top", "--help"]])
def test_the_command_is_found_after_options(argv: list[str]) -> None:
    from pfbuild.client.cli import _command_of

    assert _command_of(argv) == (None if argv == ["--help"] else argv[0])
