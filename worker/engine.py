"""The Docker engine, behind the small interface the pipeline needs.

:class:`DockerEngine` uses the docker SDK's low-level ``APIClient`` (the calls map one to
one onto the engine's API, and stream); tests put a fake behind the same
:class:`Engine` protocol to inject faults.
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Concatenate, ParamSpec, Protocol, TypeVar

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions

from pfbuild.client.errors import (
    BuildIdleTimeout,
    EngineError,
    EngineUnavailable,
    ImageLoadFailed,
    JobCancelled,
    RegistryFailed,
)
from pfbuild.client.settings import Settings
from pfbuild.worker.imagewatch import ImageWatch

__all__ = [
    "Abort",
    "BuildOutcome",
    "BuildSpec",
    "DockerEngine",
    "Engine",
    "ImageInfo",
    "RegistryFailed",
    "Transfer",
    "engine_from_settings",
    "parse_step",
]

_STEP_RE = re.compile(r"^Step (\d+)/(\d+) :")
# A log line longer than this is cut into pieces as it arrives: a build printing megabytes
# without a newline costs neither quadratic time nor unbounded memory.
MAX_LOG_LINE = 16 * 1024


def parse_step(line: str) -> tuple[int, int] | None:
    """``(i, n)`` from a classic-builder ``Step i/n :`` line, else None."""
    found = _STEP_RE.match(line)
    return (int(found.group(1)), int(found.group(2))) if found else None


@dataclass(frozen=True)
class ImageInfo:
    id: str
    labels: dict[str, str]


class Abort:
    """Stops a running build from another thread, whatever the worker pool: it shuts the
    build's connection down, and the engine stops a build whose client went away (and
    removes its container). The build then raises :class:`JobCancelled`."""

    def __init__(self) -> None:
        self.triggered = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if sock is not None and self.triggered.is_set():
                _shutdown(sock)

    def detach(self) -> None:
        with self._lock:
            self._sock = None

    def trigger(self) -> None:
        with self._lock:
            self.triggered.set()
            if self._sock is not None:
                _shutdown(self._sock)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class Transfer:
    """An image moved to or from a registry: its manifest digest and the layer bytes
    that actually crossed (layers the other side held already cost nothing)."""

    digest: str
    bytes: int = 0


class _Progress:
    """Layer sizes from a push or pull's progress stream: the largest total each layer
    announced while it was being sent or received."""

    def __init__(self) -> None:
        self.layers: dict[str, int] = {}

    def see(self, item: dict[str, Any]) -> None:
        detail = item.get("progressDetail") or {}
        if item.get("status") in ("Pushing", "Downloading") and detail.get("total"):
            layer = str(item.get("id", ""))
            self.layers[layer] = max(self.layers.get(layer, 0), int(detail["total"]))

    @property
    def bytes(self) -> int:
        return sum(self.layers.values())


@dataclass(frozen=True)
class BuildSpec:
    """What to build: the tag, the Dockerfile's name inside the context, and how."""

    tag: str
    dockerfile: str
    cache_from: list[str] = field(default_factory=list)
    nocache: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    idle_timeout: float | None = None  # seconds of silence before the build is stopped
    abort: Abort | None = field(default=None, compare=False)  # to stop it from outside


@dataclass
class BuildOutcome:
    """How one build ended: the image it made, or the engine's error."""

    image: ImageInfo | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.image is not None


class Engine(Protocol):
    """What the pipeline asks of a Docker engine."""

    host: str

    def ping(self, timeout: float | None = None) -> bool:
        """Whether the engine answers (within ``timeout`` seconds, if given)."""

    def inspect(self, tag: str) -> ImageInfo | None:
        """The image behind ``tag``, or None when this engine does not hold it."""

    def build(
        self, context: IO[bytes], spec: BuildSpec, on_line: Callable[[str], None]
    ) -> BuildOutcome:
        """Build ``context`` as ``spec`` says; every log line goes to ``on_line`` as it
        arrives. A build silent for ``spec.idle_timeout`` seconds is stopped and raises
        :class:`BuildIdleTimeout`; one stopped through ``spec.abort`` raises
        :class:`JobCancelled`."""

    def save(self, tag: str) -> Iterator[bytes]:
        """Stream ``tag`` out as an (uncompressed) image tarball."""

    def load(self, data: Iterable[bytes] | IO[bytes]) -> list[str]:
        """Stream a plain or gzip tarball in; returns what the engine reported loading.

        Raises :class:`ImageLoadFailed` when the engine refuses the tarball."""

    def remove(self, tag: str) -> None:
        """Untag ``tag`` (and drop its layers if no other tag holds them)."""

    def tag(self, source: str, target: str) -> None:
        """Give the image ``source`` the tag ``target`` too (``repo:tag`` form)."""

    def push(self, ref: str) -> Transfer:
        """Push ``ref`` (``registry/repo:tag``) and return its manifest digest."""

    def pull(self, ref: str) -> Transfer | None:
        """Pull ``ref``; its manifest digest, or None when the registry has no such image."""

    def tags(self, repository: str) -> list[str]:
        """Every ``repo:tag`` this engine holds under ``{repository}/``."""

    def tagged(self, repository: str) -> dict[str, str]:
        """:meth:`tags`, each with the id of the image it names."""


P = ParamSpec("P")
R = TypeVar("R")

# A connection refused or timed out, or one the engine dropped halfway through a stream
# (urllib3's ProtocolError reaches us raw from the SDK's stream readers)
_UNREACHABLE = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,
)


class _Lines:
    """Engine output cut into lines for ``on_line``; a line without end is cut at
    ``MAX_LOG_LINE``, never hoarded."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self.on_line = on_line
        self.pending = ""

    def feed(self, chunk: str) -> None:
        self.pending += chunk
        if "\n" in chunk:
            *lines, self.pending = self.pending.split("\n")
            for line in lines:
                self.on_line(line[:MAX_LOG_LINE])
        while len(self.pending) > MAX_LOG_LINE:
            self.on_line(self.pending[:MAX_LOG_LINE])
            self.pending = self.pending[MAX_LOG_LINE:]

    def flush(self) -> None:
        if self.pending:
            self.on_line(self.pending)
            self.pending = ""


def _follow(stream: Iterable[dict[str, Any]], lines: _Lines) -> str | None:
    """Feed a build's decoded stream to ``lines``; the engine's error, if it sent one."""
    error: str | None = None
    for item in stream:
        if "stream" in item:
            lines.feed(str(item["stream"]))
        elif "error" in item:
            error = str(item["error"]).strip()
            lines.on_line(f"ERROR: {error}")
    return error


class _APIClient(docker.APIClient):  # type: ignore[misc]
    """The SDK's client, remembering (per thread) the response a stream was opened on."""

    opened = threading.local()

    def _stream_helper(self, response: Any, decode: bool = False) -> Any:
        _APIClient.opened.response = response
        return super()._stream_helper(response, decode=decode)


def _raw_socket(response: Any) -> socket.socket | None:
    """The socket under a streaming response (http.client → SocketIO → socket)."""
    try:
        raw = response.raw._fp.fp.raw
    except AttributeError:
        return None
    sock = getattr(raw, "_sock", raw)
    return sock if isinstance(sock, socket.socket) else None


def _changes(
    method: Callable[Concatenate[DockerEngine, P], R],
) -> Callable[Concatenate[DockerEngine, P], R]:
    """A method that changes what a tag names: what inspects kept is forgotten when it
    ends, at once rather than when the engine's own event arrives."""

    def changing(self: DockerEngine, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        finally:
            if self.watch is not None:
                self.watch.forget()

    return functools.update_wrapper(changing, method)  # type: ignore[return-value]


class DockerEngine:
    """A real engine at ``base_url`` (``DOCKER_HOST`` syntax)."""

    watch: ImageWatch[ImageInfo] | None = None  # see follow_images

    def __init__(self, base_url: str, *, timeout: int = 600) -> None:
        self.host = base_url
        try:
            api = _APIClient(base_url=base_url, timeout=timeout, version="auto")
            self.api: docker.APIClient = api
            if base_url.startswith("unix://"):
                # no proxy or netrc applies to a local socket; looking them up costs more
                # than the inspect of a cache hit itself
                self.api.trust_env = False
        except (docker.errors.DockerException, *_UNREACHABLE) as exc:
            raise EngineUnavailable(
                f"cannot reach the Docker engine at {base_url}: {exc}. "
                "Start dockerd or point DOCKER_HOST at a running engine."
            ) from None

    def ping(self, timeout: float | None = None) -> bool:
        try:
            if timeout is None:
                return bool(self.api.ping())
            # the SDK's ping takes no timeout of its own; the endpoint needs no API version
            return bool(self.api.get(f"{self.api.base_url}/_ping", timeout=timeout).ok)
        except (docker.errors.DockerException, *_UNREACHABLE):
            return False

    def follow_images(self, max_age: float = 30.0) -> None:
        """Keep what inspects find while the engine's image events say nothing changed
        (:mod:`pfbuild.worker.imagewatch`): a worker's cache hits then skip the engine."""

        def open_events() -> Iterable[Any]:
            # a client of its own: the stream holds its connection for as long as it runs
            api = docker.APIClient(base_url=self.host, version=self.api.api_version)
            api.trust_env = False
            # The engine answers the request a moment before it subscribes: replaying the
            # last seconds' events covers that moment (a replayed event only forgets).
            since = int(time.time()) - 2
            return api.events(  # type: ignore[no-any-return]
                since=since, decode=True, filters={"type": "image"}
            )

        self.watch = ImageWatch[ImageInfo](open_events, max_age=max_age)

    def inspect(self, tag: str) -> ImageInfo | None:
        if self.watch is None:
            return self._inspect(tag)
        kept = self.watch.get(tag)
        if kept is not None:
            return kept
        generation = self.watch.generation()
        found = self._inspect(tag)
        self.watch.keep(tag, found, generation)
        return found

    def _inspect(self, tag: str) -> ImageInfo | None:
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

    @_changes
    def build(
        self, context: IO[bytes], spec: BuildSpec, on_line: Callable[[str], None]
    ) -> BuildOutcome:
        lines = _Lines(on_line)
        error: str | None = None
        try:
            stream = self.api.build(
                fileobj=context,
                custom_context=True,
                tag=spec.tag,
                dockerfile=spec.dockerfile,
                cache_from=spec.cache_from or None,
                nocache=spec.nocache,
                labels=spec.labels,
                rm=True,
                forcerm=True,
                decode=True,
                # each read of the stream waits at most this long: the engine stops the
                # build when the connection closes, so a silent build ends here
                timeout=spec.idle_timeout,
            )
            error = self._follow_abortable(stream, lines, spec.abort)
        except (urllib3.exceptions.ReadTimeoutError, requests.exceptions.ReadTimeout) as exc:
            lines.flush()
            _raise_if_aborted(spec.abort)
            raise self._silent(spec.idle_timeout, exc) from None
        except _UNREACHABLE as exc:
            _raise_if_aborted(spec.abort)
            raise EngineUnavailable(
                f"Docker engine at {self.host} failed mid-build: {exc}"
            ) from None
        except docker.errors.APIError as exc:
            error = f"engine refused the build: {exc.explanation or exc}"
            on_line(f"ERROR: {error}")
        lines.flush()
        _raise_if_aborted(spec.abort)
        if error is not None:
            return BuildOutcome(image=None, error=error)
        built = self._inspect(spec.tag)
        if built is None:
            return BuildOutcome(None, "the engine reported success but the image tag is missing")
        return BuildOutcome(image=built, error=None)

    @staticmethod
    def _follow_abortable(stream: Iterable[Any], lines: _Lines, abort: Abort | None) -> str | None:
        if abort is None:
            return _follow(stream, lines)
        abort.attach(_raw_socket(getattr(_APIClient.opened, "response", None)))
        try:
            return _follow(stream, lines)
        except Exception:
            _raise_if_aborted(abort)
            raise
        finally:
            abort.detach()
            _APIClient.opened.response = None

    def _silent(
        self, idle_timeout: float | None, exc: Exception
    ) -> EngineUnavailable | BuildIdleTimeout:
        """The error for a build stream that stopped talking: the engine's, or the build's."""
        if idle_timeout is None or not self.ping():
            return EngineUnavailable(
                f"Docker engine at {self.host} stopped answering mid-build: {exc}"
            )
        return BuildIdleTimeout(
            f"the build printed nothing for {idle_timeout:g}s and was stopped "
            "(an install command waiting for input or a hung download?); "
            "raise PFBUILD_IDLE_TIMEOUT if it is just slow and quiet",
            details={"idle_timeout": idle_timeout},
        )

    def save(self, tag: str) -> Iterator[bytes]:
        try:
            yield from self.api.get_image(tag)
        except docker.errors.APIError as exc:
            why = exc.explanation or exc
            raise EngineError(f"the engine could not save {tag}: {why}") from None
        except _UNREACHABLE as exc:
            raise EngineUnavailable(
                f"Docker engine at {self.host} failed during save: {exc}"
            ) from None

    @_changes
    def load(self, data: Iterable[bytes] | IO[bytes]) -> list[str]:
        loaded: list[str] = []
        try:
            for item in self.api.load_image(data):
                if "error" in item:
                    raise ImageLoadFailed(str(item["error"]).strip())
                if "stream" in item:
                    loaded.append(str(item["stream"]).strip())
        except docker.errors.APIError as exc:
            raise ImageLoadFailed(str(exc.explanation or exc)) from None
        except _UNREACHABLE as exc:
            raise EngineUnavailable(
                f"Docker engine at {self.host} failed during load: {exc}"
            ) from None
        return loaded

    @_changes
    def remove(self, tag: str) -> None:
        with contextlib.suppress(docker.errors.ImageNotFound):
            self.api.remove_image(tag, force=True)

    @_changes
    def tag(self, source: str, target: str) -> None:
        repo, _, tag = target.rpartition(":")
        try:
            self.api.tag(source, repo, tag, force=True)
        except _UNREACHABLE as exc:
            raise EngineUnavailable(f"Docker engine at {self.host} failed to tag: {exc}") from None

    def push(self, ref: str) -> Transfer:
        repo, _, tag = ref.rpartition(":")
        digest: str | None = None
        moved = _Progress()
        try:
            for item in self.api.push(repo, tag=tag, stream=True, decode=True):
                if "error" in item:
                    raise RegistryFailed(str(item["error"]).strip())
                moved.see(item)
                aux = item.get("aux")
                if isinstance(aux, dict) and "Digest" in aux:
                    digest = str(aux["Digest"])
        except docker.errors.APIError as exc:
            raise RegistryFailed(str(exc.explanation or exc)) from None
        except _UNREACHABLE as exc:
            raise EngineUnavailable(f"Docker engine at {self.host} failed to push: {exc}") from None
        if digest is None:
            raise RegistryFailed(f"the engine pushed {ref} but reported no digest")
        return Transfer(digest, moved.bytes)

    @_changes
    def pull(self, ref: str) -> Transfer | None:
        repo, _, tag = ref.rpartition(":")
        digest: str | None = None
        moved = _Progress()
        try:
            for item in self.api.pull(repo, tag=tag, stream=True, decode=True):
                if "error" in item:
                    raise RegistryFailed(str(item["error"]).strip())
                moved.see(item)
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
        return Transfer(digest or "unknown", moved.bytes)

    def tags(self, repository: str) -> list[str]:
        return sorted(self.tagged(repository))

    def tagged(self, repository: str) -> dict[str, str]:
        try:
            images: list[dict[str, Any]] = self.api.images(filters={"reference": f"{repository}/*"})
        except _UNREACHABLE as exc:
            raise EngineUnavailable(
                f"Docker engine at {self.host} stopped answering: {exc}"
            ) from None
        return {
            str(t): str(image["Id"])
            for image in images
            for t in image.get("RepoTags") or []
            if t != "<none>:<none>"
        }

def _raise_if_aborted(abort: Abort | None) -> None:
    if abort is not None and abort.triggered.is_set():
        raise JobCancelled("the build was cancelled; the engine stopped it") from None


def engine_from_settings(settings: Settings) -> DockerEngine:
    """The engine this worker talks to (``DOCKER_HOST``), with the configured API timeout."""
    return DockerEngine(settings.docker_host_name(), timeout=settings.docker_timeout)
