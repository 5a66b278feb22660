"""The Docker engine, behind the small interface the pipeline needs.

:class:`DockerEngine` uses the docker SDK's low-level ``APIClient`` (the calls map one to
one onto the engine's API, and stream); tests put a fake behind the same
:class:`Engine` protocol to inject faults.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol

import docker
import docker.errors
import requests.exceptions

from pfbuild.client.errors import EngineUnavailable, PfbuildError

__all__ = [
    "BuildOutcome",
    "DockerEngine",
    "Engine",
    "ImageInfo",
    "LoadFailed",
    "RegistryFailed",
    "parse_step",
]

_STEP_RE = re.compile(r"^Step (\d+)/(\d+) :")


def parse_step(line: str) -> tuple[int, int] | None:
    """``(i, n)`` from a classic-builder ``Step i/n :`` line, else None."""
    found = _STEP_RE.match(line)
    return (int(found.group(1)), int(found.group(2))) if found else None


class LoadFailed(Exception):
    """The engine refused a tarball (internal to the cache stage)."""


class RegistryFailed(Exception):
    """A push or pull failed for another reason than a missing image (internal to the
    registry tier, which falls back to the next tier rather than failing the build)."""


@dataclass(frozen=True)
class ImageInfo:
    id: str
    labels: dict[str, str]


@dataclass
class BuildOutcome:
    ok: bool
    image_id: str | None
    error: str | None


class Engine(Protocol):
    """What the pipeline asks of a Docker engine."""

    host: str

    def ping(self) -> bool:
        """Whether the engine answers."""

    def inspect(self, tag: str) -> ImageInfo | None:
        """The image behind ``tag``, or None when this engine does not hold it."""

    def build(
        self,
        context: IO[bytes],
        *,
        tag: str,
        dockerfile: str,
        cache_from: list[str],
        nocache: bool,
        labels: dict[str, str],
        on_line: Callable[[str], None],
    ) -> BuildOutcome:
        """Build ``context``; every log line goes to ``on_line`` as it arrives."""

    def save(self, tag: str) -> Iterator[bytes]:
        """Stream ``tag`` out as an (uncompressed) image tarball."""

    def load(self, data: Iterable[bytes] | IO[bytes]) -> list[str]:
        """Stream a plain or gzip tarball in; returns what the engine reported loading."""

    def remove(self, tag: str) -> None:
        """Untag ``tag`` (and drop its layers if no other tag holds them)."""

    def tag(self, source: str, target: str) -> None:
        """Give the image ``source`` the tag ``target`` too (``repo:tag`` form)."""

    def push(self, ref: str) -> str:
        """Push ``ref`` (``registry/repo:tag``) and return its manifest digest."""

    def pull(self, ref: str) -> str | None:
        """Pull ``ref``; its manifest digest, or None when the registry has no such image."""

    def tags(self, repository: str) -> list[str]:
        """Every ``repo:tag`` this engine holds under ``{repository}/``."""


_UNREACHABLE = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)


class DockerEngine:
    """A real engine at ``base_url`` (``DOCKER_HOST`` syntax)."""

    def __init__(self, base_url: str, *, timeout: int = 600) -> None:
        self.host = base_url
        try:
            self.api = docker.APIClient(base_url=base_url, timeout=timeout, version="auto")
        except (docker.errors.DockerException, *_UNREACHABLE) as exc:
            raise EngineUnavailable(
                f"cannot reach the Docker engine at {base_url}: {exc}. "
                "Start dockerd or point DOCKER_HOST at a running engine."
            ) from None

    def ping(self) -> bool:
        try:
            return bool(self.api.ping())
        except (docker.errors.DockerException, *_UNREACHABLE):
            return False

    def inspect(self, tag: str) -> ImageInfo | None:
        try:
            info: dict[str, Any] = self.api.inspect_image(tag)
        except docker.errors.ImageNotFound:
            return None
        except _UNREACHABLE as exc:
            raise EngineUnavailable(
                f"Docker engine at {self.host} stopped answering: {exc}"
            ) from None
        labels = (info.get("Config") or {}).get("Labels") or {}
        return ImageInfo(id=str(info["Id"]), labels={str(k): str(v) for k, v in labels.items()})

    def build(
        self,
        context: IO[bytes],
        *,
        tag: str,
        dockerfile: str,
        cache_from: list[str],
        nocache: bool,
        labels: dict[str, str],
        on_line: Callable[[str], None],
    ) -> BuildOutcome:
        pending = ""
        error: str | None = None
        image_id: str | None = None
        try:
            stream = self.api.build(
                fileobj=context,
                custom_context=True,
                tag=tag,
                dockerfile=dockerfile,
                cache_from=cache_from or None,
                nocache=nocache,
                labels=labels,
                rm=True,
                forcerm=True,
                decode=True,
            )
            for item in stream:
                if "stream" in item:
                    pending += str(item["stream"])
                    *lines, pending = pending.split("\n")
                    for line in lines:
                        on_line(line)
                elif "error" in item:
                    error = str(item["error"]).strip()
                    on_line(f"ERROR: {error}")
                elif isinstance(item.get("aux"), dict) and "ID" in item["aux"]:
                    image_id = str(item["aux"]["ID"])
        except _UNREACHABLE as exc:
            raise EngineUnavailable(
                f"Docker engine at {self.host} failed mid-build: {exc}"
            ) from None
        except docker.errors.APIError as exc:
            error = f"engine refused the build: {exc.explanation or exc}"
            on_line(f"ERROR: {error}")
        if pending:
            on_line(pending)
        if error is None:
            built = self.inspect(tag)
            image_id = built.id if built else None
            if image_id is None:
                error = "the engine reported success but the image tag is missing"
        return BuildOutcome(ok=error is None, image_id=image_id, error=error)

    def save(self, tag: str) -> Iterator[bytes]:
        try:
            yield from self.api.get_image(tag)
        except docker.errors.APIError as exc:
            raise PfbuildError(
                f"the engine could not save {tag}: {exc.explanation or exc}"
            ) from None
        except _UNREACHABLE as exc:
            raise EngineUnavailable(
                f"Docker engine at {self.host} failed during save: {exc}"
            ) from None

    def load(self, data: Iterable[bytes] | IO[bytes]) -> list[str]:
        loaded: list[str] = []
        try:
            for item in self.api.load_image(data):
                if "error" in item:
                    raise LoadFailed(str(item["error"]).strip())
                if "stream" in item:
                    loaded.append(str(item["stream"]).strip())
        except docker.errors.APIError as exc:
            raise LoadFailed(str(exc.explanation or exc)) from None
        except _UNREACHABLE as exc:
            raise EngineUnavailable(
                f"Docker engine at {self.host} failed during load: {exc}"
            ) from None
        return loaded

    def remove(self, tag: str) -> None:
        with contextlib.suppress(docker.errors.ImageNotFound):
            self.api.remove_image(tag, force=True)

    def tag(self, source: str, target: str) -> None:
        repo, _, tag = target.rpartition(":")
        try:
            self.api.tag(source, repo, tag, force=True)
        except _UNREACHABLE as exc:
            raise EngineUnavailable(f"Docker engine at {self.host} failed to tag: {exc}") from None

    def push(self, ref: str) -> str:
        repo, _, tag = ref.rpartition(":")
        digest: str | None = None
        try:
            for item in self.api.push(repo, tag=tag, stream=True, decode=True):
                if "error" in item:
                    raise RegistryFailed(str(item["error"]).strip())
                aux = item.get("aux")
                if isinstance(aux, dict) and "Digest" in aux:
                    digest = str(aux["Digest"])
        except docker.errors.APIError as exc:
            raise RegistryFailed(str(exc.explanation or exc)) from None
        except _UNREACHABLE as exc:
            raise EngineUnavailable(f"Docker engine at {self.host} failed to push: {exc}") from None
        if digest is None:
            raise RegistryFailed(f"the engine pushed {ref} but reported no digest")
        return digest

    def pull(self, ref: str) -> str | None:
        repo, _, tag = ref.rpartition(":")
        digest: str | None = None
        try:
            for item in self.api.pull(repo, tag=tag, stream=True, decode=True):
                if "error" in item:
                    raise RegistryFailed(str(item["error"]).strip())
                status = str(item.get("status", ""))
                if status.startswith("Digest: "):
                    digest = status.removeprefix("Digest: ").strip()
        except docker.errors.NotFound:
            return None  # the registry answered: it has no such image
        except docker.errors.APIError as exc:
            raise RegistryFailed(str(exc.explanation or exc)) from None
        except _UNREACHABLE as exc:
            raise EngineUnavailable(f"Docker engine at {self.host} failed to pull: {exc}") from None
        if digest is None:  # an engine that does not say it: ask the image
            info: dict[str, Any] = self.api.inspect_image(ref)
            for repo_digest in info.get("RepoDigests") or []:
                if str(repo_digest).startswith(repo + "@"):
                    digest = str(repo_digest).partition("@")[2]
        return digest or "unknown"

    def tags(self, repository: str) -> list[str]:
        try:
            images: list[dict[str, Any]] = self.api.images(filters={"reference": f"{repository}/*"})
        except _UNREACHABLE as exc:
            raise EngineUnavailable(
                f"Docker engine at {self.host} stopped answering: {exc}"
            ) from None
        return sorted(
            str(t) for image in images for t in image.get("RepoTags") or [] if t != "<none>:<none>"
        )
