"""An offline base image: ``python:{version}-slim`` made from Debian's packages.

For air-gapped engines that cannot pull from a registry. debootstrap makes a minimal
Debian root with the Debian release's own Python, pip made usable system-wide (as in the
official image), extra CA certificates trusted when asked (for a TLS-intercepting proxy),
and the tree is imported as the image. Idempotent: an existing image is left alone.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import docker.errors

from pfbuild.client.errors import BadRequest, BaseImageFailed
from pfbuild.worker.engine import DockerEngine

__all__ = ["DEBIAN_PYTHON", "apt_mirror", "ensure_base_image"]

log = logging.getLogger(__name__)

# The Python each Debian release ships as python3.
DEBIAN_PYTHON = {"3.7": "buster", "3.9": "bullseye", "3.11": "bookworm", "3.13": "trixie"}
PACKAGES = "python3,python3-pip,python3-venv,python-is-python3,ca-certificates"
_APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def apt_mirror() -> str | None:
    """The first Debian mirror the host's own apt uses (deb822 or one-line format)."""
    files: list[Path] = []
    for src in _APT_SOURCES:
        if src.is_dir():
            files += sorted(src.glob("*.sources")) + sorted(src.glob("*.list"))
        elif src.is_file():
            files.append(src)
    for f in files:
        text = f.read_text(errors="replace")
        for pattern in (r"^URIs:\s*(\S+)", r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)"):
            for url in re.findall(pattern, text, re.MULTILINE):
                if not url.rstrip("/").endswith("-security"):
                    return str(url)
    return None


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise BaseImageFailed(f"{what} failed (exit {proc.returncode}):\n{tail}")


def ensure_base_image(
    engine: DockerEngine,
    image: str,
    *,
    ca_dir: Path | None = None,
    mirror: str | None = None,
    force: bool = False,
    pull: bool = True,
    say: Callable[[str], None] = log.info,
) -> str:
    """Make sure ``image`` (``python:X.Y-slim``) exists; returns how it got there."""
    if not force and engine.inspect(image) is not None:
        return "exists"
    repo, _, tag = image.rpartition(":")
    if pull:
        try:
            say(f"pulling {image} ...")
            engine.api.pull(repo, tag=tag)
            return "pulled"
        except (docker.errors.APIError, docker.errors.DockerException) as exc:
            say(f"cannot pull {image} ({str(exc).splitlines()[0][:200]}); making it offline")
    found = re.search(r"(\d+\.\d+)", tag)
    suite = DEBIAN_PYTHON.get(found.group(1)) if found else None
    if suite is None:
        raise BadRequest(
            f"cannot make {image} offline: Debian ships Python "
            f"{', '.join(sorted(DEBIAN_PYTHON))} only"
        )
    mirror = mirror or apt_mirror()
    if not mirror:
        raise BadRequest("no Debian mirror given (--mirror) and none found in apt's sources")
    if shutil.which("debootstrap") is None:
        raise BaseImageFailed("debootstrap is not installed (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="pfbuild-rootfs-") as tmp:
        archive = _rootfs_archive(Path(tmp), suite, mirror, ca_dir, say)
        say(f"importing as {image} ...")
        engine.api.import_image_from_file(
            str(archive),
            repository=repo,
            tag=tag,
            changes=["ENV LANG=C.UTF-8", 'CMD ["python3"]'],
        )
    if engine.inspect(image) is None:
        raise BaseImageFailed(f"import finished but {image} is not in the engine")
    return "made"


def _rootfs_archive(
    tmp: Path, suite: str, mirror: str, ca_dir: Path | None, say: Callable[[str], None]
) -> Path:
    """debootstrap a minimal root under ``tmp`` and tar it; returns the tar's path."""
    rootfs = tmp / "rootfs"
    say(f"debootstrap {suite} from {mirror} (about a minute) ...")
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={PACKAGES}",
            suite,
            str(rootfs),
            mirror,
        ],
        "debootstrap",
    )
    # pip is usable system-wide in the official image; PEP 668 would refuse it here
    for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    if ca_dir is not None:
        certs = sorted(Path(ca_dir).glob("*.crt"))
        dest = rootfs / "usr/local/share/ca-certificates"
        dest.mkdir(parents=True, exist_ok=True)
        for cert in certs:
            shutil.copy(cert, dest / cert.name)
        _run(["chroot", str(rootfs), "update-ca-certificates"], "update-ca-certificates")
        say(f"trusting {len(certs)} extra CA certificate(s)")
    for leftover in rootfs.glob("var/cache/apt/archives/*.deb"):
        leftover.unlink()
    archive = tmp / "rootfs.tar"
    _run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(archive), "."], "tar")
    return archive
