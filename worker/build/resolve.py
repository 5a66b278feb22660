"""The first stage: check a request's paths and profile once, before anything is written.

Paths are resolved (symlinks followed) and held to the worker's allowed roots; the
folders pfbuild writes into inside the repository (the artifact folder and the default
tarball cache, see :mod:`pfbuild.worker.layout`) must not be symbolic links, or a
repository could point pfbuild's writes anywhere on the worker. Every later stage takes
the :class:`ResolvedRequest` this returns and never looks at the raw request again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pfbuild.client.errors import BadRequest
from pfbuild.client.inputs import resolve_path
from pfbuild.client.models import BuildRequest
from pfbuild.client.profile import Profile, load_profile_file, parse_profile
from pfbuild.client.settings import Settings
from pfbuild.worker import layout

__all__ = ["ResolvedRequest", "resolve_request"]


@dataclass(frozen=True)
class ResolvedRequest:
    """A request whose paths and profile have been checked."""

    request: BuildRequest
    profile: Profile
    repo_dir: Path
    cache_dir: Path

    @property
    def artifacts(self) -> Path:
        return layout.artifact_dir(self.repo_dir, self.profile.profile_id)

    @property
    def profile_id(self) -> str:
        return self.profile.profile_id


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == r.resolve() or path.is_relative_to(r.resolve()) for r in roots)


def _no_links(repo: Path, *parts: str) -> Path:
    """``repo/parts...``, refusing any component that is a symbolic link."""
    path = repo
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise BadRequest(
                f"{path} is a symbolic link; pfbuild writes there and will not follow a "
                "link out of the repository"
            )
    return path


def resolve_request(request: BuildRequest, settings: Settings) -> ResolvedRequest:
    """Check paths (existence, allowed roots, links) and the profile; BadRequest if wrong.

    ``request`` comes from :func:`validate_request` (the task, the CLI and the client all
    validate on entry), so its text is already held to the limits.
    """
    repo, _ = resolve_path(request.repo_dir, what="repo_dir", must_exist=True)
    if not repo.is_dir():
        raise BadRequest(f"repo_dir {request.repo_dir!r} is not a directory")
    roots = settings.allowed_roots
    if roots and not _under(repo, roots):
        raise BadRequest(
            f"repo_dir {request.repo_dir!r} is outside the worker's allowed roots "
            f"({', '.join(str(r) for r in roots)})"
        )
    if request.profile is not None:
        profile = parse_profile(request.profile, source="profile", settings=settings)
    else:
        assert request.profile_path is not None
        ppath, _ = resolve_path(request.profile_path, what="profile_path", must_exist=True)
        if roots and not _under(ppath, roots):
            raise BadRequest(f"profile_path {request.profile_path!r} is outside the allowed roots")
        document = load_profile_file(ppath, settings)
        profile = parse_profile(document, source=str(ppath), settings=settings)
    _no_links(repo, *layout.artifact_parts(profile.profile_id))
    if request.image_cache_dir:
        cache_dir, exists = resolve_path(
            request.image_cache_dir, what="image_cache_dir", must_exist=False
        )
        allowed = [*roots, *([settings.tmp_dir] if settings.tmp_dir else [])]
        if roots and not _under(cache_dir, allowed):
            raise BadRequest(
                f"image_cache_dir {request.image_cache_dir!r} is outside the allowed roots"
            )
        if exists and not cache_dir.is_dir():
            raise BadRequest(f"image_cache_dir {request.image_cache_dir!r} is not a directory")
    elif settings.tmp_dir:
        cache_dir = settings.tmp_dir.resolve() / layout.CACHE_DIR
    else:
        cache_dir = _no_links(repo, layout.SCRATCH_DIR, layout.CACHE_DIR)
    trust = settings.trust_dir().resolve()
    if cache_dir == trust or cache_dir.is_relative_to(trust):
        raise BadRequest(f"image_cache_dir {str(cache_dir)!r} is inside the worker's state folder")
    return ResolvedRequest(request, profile, repo, cache_dir)
