"""Helpers for tests on two engines: count builds with `docker events`, tidy a registry."""

from __future__ import annotations

import contextlib
import threading
import urllib.request
from collections import Counter
from types import TracebackType
from typing import Any

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
