"""Helpers for tests on two engines: count builds with `docker events`, tidy a registry,
make an engine vanish mid-stream."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import redis

LABELS = ("org.pfbuild.profile_id", "org.pfbuild.variant", "org.pfbuild.dockerfile_sha256")


class BuildCounter:
    """Counts the builds of each profile on one engine, from its `docker events`.

    The classic builder ends every build with one step per label it applies, and each
    step's container carries the labels applied so far: one ``container create`` event
    carrying all of pfbuild's labels is one build of P (a pull or a load creates none).
    The events are streamed from the start: an engine replays only its last 256.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.builds: Counter[str] = Counter()

    def __enter__(self) -> BuildCounter:
        self.stream = self.engine.api.events(
            decode=True, filters={"type": "container", "event": "create"}
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        try:
            for event in self.stream:
                attrs = (event.get("Actor") or {}).get("Attributes") or {}
                if all(label in attrs for label in LABELS):
                    self.builds[str(attrs["org.pfbuild.profile_id"])] += 1
        except Exception:
            pass  # the stream was closed

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stream.close()
        self.thread.join(5)


def delete_from_registry(addr: str, repository: str, digest: str) -> None:
    """Delete a manifest (the registry's config enables delete); blobs wait for its GC."""
    req = urllib.request.Request(f"http://{addr}/v2/{repository}/manifests/{digest}",
                                 method="DELETE")
    with contextlib.suppress(OSError):
        urllib.request.urlopen(req, timeout=10).close()


class EngineProxy:
    """A unix socket in front of a real engine's; :meth:`kill` drops every connection and
    the socket, so the engine vanishes for whoever talks through it, mid-stream included
    (the engine itself stops a build whose client went away)."""

    def __init__(self, path: str, target: str) -> None:
        self.path, self.target = path, target
        self.url = f"unix://{path}"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(64)
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.dead = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # killed
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            with self.lock:
                if self.dead:
                    client.close()
                    upstream.close()
                    return
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def kill(self) -> None:
        with self.lock:
            self.dead = True
            self.server.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            for s in self.conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()


@contextlib.contextmanager
def engine_proxy(engine: Any) -> Iterator[EngineProxy]:
    """An :class:`EngineProxy` in front of ``engine`` (a unix socket), killed at the end."""
    if not engine.host.startswith("unix://"):
        pytest.skip("the proxy stands in front of a unix socket")
    short = Path(tempfile.mkdtemp(prefix="pfek-"))  # a socket path must be short
    proxy = EngineProxy(str(short / "engine.sock"), engine.host.removeprefix("unix://"))
    try:
        yield proxy
    finally:
        proxy.kill()
        shutil.rmtree(short, ignore_errors=True)


def index_holds(url: str, member: str, image_id: str | None, timeout: float = 20) -> None:
    """Wait until the farm's index of held codes says ``member`` names ``image_id`` (None:
    is not held): hosts record it from their engine's image events."""
    client = redis.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {v for k in client.scan_iter("pfbuild:host:*:codes")
                 if (v := client.hget(k, member)) is not None}
        if (image_id in found) if image_id else not found:
            return
        time.sleep(0.05)
    raise AssertionError(f"the index never said {member} -> {image_id}")
