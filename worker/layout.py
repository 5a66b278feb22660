"""Where pfbuild reads and writes inside a repository and a cache folder: one home for
every folder and file name (see docs/design.md, "What a build writes").

    {repo_dir}/.pf_manifest/image_build/{profile_id}/   Dockerfile*, build.log, manifest.json
    {repo_dir}/.pf_manifest/unsupported_registry.json   failures counted per profile and class
    {repo_dir}/.tmp-test/image-cache/                   the default tarball cache
    {cache_dir}/{profile_id}+f{fence}.tar.zst (+ .sha256)  a saved image, per lock fence
    {cache_dir}/{profile_id}.tar.zst (+ .sha256)        a saved image (no queue, no fence)
    {cache_dir}/quarantine/                             tarballs that failed their checks

Neither ``.pf_manifest`` nor ``.tmp-test`` ever enters a build context.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ARTIFACTS_DIR",
    "BUILD_LOG",
    "CACHE_DIR",
    "EXCLUDED_FROM_CONTEXT",
    "MANIFEST",
    "QUARANTINE_DIR",
    "SCRATCH_DIR",
    "artifact_dir",
    "artifact_parts",
    "fenced_tarballs",
    "tarball_name",
    "unfenced",
    "unsupported_registry",
]

ARTIFACTS_DIR = ".pf_manifest"
SCRATCH_DIR = ".tmp-test"
CACHE_DIR = "image-cache"
QUARANTINE_DIR = "quarantine"
BUILD_LOG = "build.log"
MANIFEST = "manifest.json"
EXCLUDED_FROM_CONTEXT = (ARTIFACTS_DIR, SCRATCH_DIR)

_IMAGE_BUILD = "image_build"
_UNSUPPORTED = "unsupported_registry.json"


def artifact_dir(repo_dir: Path, profile_id: str) -> Path:
    """One folder per profile, so two profiles of one repo never share a file."""
    return repo_dir / ARTIFACTS_DIR / _IMAGE_BUILD / profile_id


def artifact_parts(profile_id: str) -> tuple[str, ...]:
    """The components of :func:`artifact_dir` below the repository, for link checks."""
    return (ARTIFACTS_DIR, _IMAGE_BUILD, profile_id)


def unsupported_registry(repo_dir: Path) -> Path:
    return repo_dir / ARTIFACTS_DIR / _UNSUPPORTED


# between a profile id and a lock fence: a character no Docker image name (nor profile id)
# may hold, so ``{profile_id}+f{fence}`` never reads as another profile's name
_FENCE_MARK = "+f"
_TARBALL_SUFFIX = ".tar.zst"


def tarball_name(profile_id: str, fence: int | None = None) -> str:
    """``{profile_id}.tar.zst``, or ``{profile_id}+f{fence}.tar.zst`` for a tarball saved
    under the profile lock at ``fence``: one file per fence, so no holder ever writes
    over another's, and the highest fence is the newest."""
    if fence is None:
        return f"{profile_id}{_TARBALL_SUFFIX}"
    return f"{profile_id}{_FENCE_MARK}{fence}{_TARBALL_SUFFIX}"


def unfenced(stem: str) -> str:
    """The profile id in a tarball's name less its suffix: ``{profile_id}+f{fence}`` or
    ``{profile_id}``."""
    head, mark, fence = stem.rpartition(_FENCE_MARK)
    return head if mark and fence.isdigit() else stem


def fenced_tarballs(cache_dir: Path, profile_id: str) -> list[tuple[int, Path]]:
    """The fenced tarballs of ``profile_id`` in ``cache_dir``, newest (highest fence) first."""
    prefix = f"{profile_id}{_FENCE_MARK}"
    found = []
    try:
        entries = list(os.scandir(cache_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        name = entry.name
        if name.startswith(prefix) and name.endswith(_TARBALL_SUFFIX):
            number = name[len(prefix) : -len(_TARBALL_SUFFIX)]
            if number.isdigit():
                found.append((int(number), cache_dir / name))
    return sorted(found, reverse=True)
