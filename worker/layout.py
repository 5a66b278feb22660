"""Where pfbuild reads and writes inside a repository and a cache folder: one home for
every folder and file name (see docs/design.md, "What a build writes").

    {repo_dir}/.pf_manifest/image_build/{profile_id}/   Dockerfile*, build.log, manifest.json
    {repo_dir}/.pf_manifest/unsupported_registry.json   failures counted per profile and class
    {repo_dir}/.tmp-test/image-cache/                   the default tarball cache
    {cache_dir}/{profile_id}.tar.zst (+ .sha256)        a saved image
    {cache_dir}/quarantine/                             tarballs that failed their checks

Neither ``.pf_manifest`` nor ``.tmp-test`` ever enters a build context.
"""

from __future__ import annotations

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
    "tarball_name",
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


def tarball_name(profile_id: str) -> str:
    return f"{profile_id}.tar.zst"
