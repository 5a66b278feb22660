"""Real projects nobody here wrote: build their images with pfbuild, then run their own
test suites inside those images. Sources are the projects' sdists from PyPI, unpacked
as a checked-out repository would be."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import docker
import pytest

from pfbuild.client.models import BuildRequest
from pfbuild.client.settings import Settings
from tests.conftest import missing
from tests.fakes import run_request

pytestmark = pytest.mark.docker

PROJECTS = {
    # name==version: (install commands, the project's own test command, what success prints)
    "six==1.16.0": (["pip install .", "pip install pytest==8.3.3"],
                    "python -m pytest -q -p no:cacheprovider test_six.py", " passed"),
    "more-itertools==10.5.0": (["pip install ."],
                               "python -m unittest discover -s tests", "\nOK"),
}


def _checkout(spec: str, dest: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
         "--disable-pip-version-check", "-q", spec, "-d", str(dest)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        missing(f"the sdist of {spec} from PyPI ({proc.stderr.strip()[-200:]})")
    (archive,) = dest.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    (root,) = (p for p in dest.iterdir() if p.is_dir())
    return root


@pytest.mark.parametrize("spec", sorted(PROJECTS))
def test_project_builds_and_its_own_tests_pass(spec: str, docker_engine, tmp_path: Path,  # type: ignore[no-untyped-def]
                                               settings: Settings,
                                               cleanup_images: list[str]) -> None:
    install, test_cmd, success = PROJECTS[spec]
    repo = _checkout(spec, tmp_path / "src")
    profile = {"python_version_target": "3.11", "install_cmds": install,
               "env": {"PYTHONDONTWRITEBYTECODE": "1", "PFTEST_NONCE": uuid.uuid4().hex},
               "project": spec}
    answer = run_request(BuildRequest(repo_dir=str(repo), profile=profile), settings,
                       docker_engine)
    cleanup_images.append(answer.image_tag)
    assert answer.cache_source == "built"
    container = docker.from_env().containers.run(answer.image_tag, ["sh", "-c", test_cmd],
                                                 detach=True)
    try:
        status = container.wait(timeout=600)
        output = container.logs().decode("utf-8", "replace")
    finally:
        container.remove(force=True)
    assert status["StatusCode"] == 0, output[-3000:]
    assert success in output, output[-3000:]
