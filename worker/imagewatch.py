"""What this engine's tags named a moment ago, kept while the engine says nothing changed.

A cache hit asks the engine which image a tag names; that inspect costs more than the
rest of the hit together. A worker process therefore keeps what its inspects found, and a
thread follows the engine's image events (``tag``, ``untag``, ``delete``, ``load``,
``pull``, …): any of them, by anyone on this engine, forgets everything kept. So does
every change this process makes itself (it does not wait for its own event), a lost
event stream (nothing is kept until it is back), and age (``max_age`` seconds), in case
the stream stalls without breaking.

Only found images are kept: a miss goes on to a build, which asks again anyway. An
inspect that overlaps a change is not kept either (the generation moved while it ran).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

__all__ = ["ImageWatch"]

log = logging.getLogger(__name__)

EventStream = Callable[[], Iterable[Any]]
T = TypeVar("T")


_WATCHES: weakref.WeakSet[ImageWatch[Any]] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for watch in list(_WATCHES):
        watch._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


class ImageWatch(Generic[T]):
    """A per-process cache of ``inspect`` answers, cleared by the engine's image events.

    ``open_events`` opens a stream of the engine's image events that covers the moment it
    was opened: the engine answers the request a moment before it subscribes, so the
    opener replays the last seconds' events (``DockerEngine.follow_images``)."""

    def __init__(self, open_events: EventStream, *, max_age: float = 30.0) -> None:
        self._open_events = open_events
        self.max_age = max_age
        self._lock = threading.Lock()
        self._kept: dict[str, tuple[float, T]] = {}
        self._generation = 0
        self._live = False
        self._pid = -1
        self._stream: Any = None
        _WATCHES.add(self)

    def get(self, tag: str) -> T | None:
        """What ``tag`` named, if kept and still current; else None (ask the engine)."""
        self._ensure_following()
        with self._lock:
            if not self._live:
                return None
            entry = self._kept.get(tag)
            if entry is None or time.monotonic() - entry[0] > self.max_age:
                return None
            return entry[1]

    def generation(self) -> int:
        """Take this before an inspect; hand it to :meth:`keep` with the inspect's answer."""
        with self._lock:
            return self._generation

    def keep(self, tag: str, info: T | None, generation: int) -> None:
        """Keep ``info`` for ``tag`` unless something changed since ``generation``."""
        with self._lock:
            if self._live and generation == self._generation and info is not None:
                self._kept[tag] = (time.monotonic(), info)

    def forget(self) -> None:
        """Something changed on the engine: nothing kept is current any more."""
        with self._lock:
            self._generation += 1
            self._kept.clear()

    def close(self) -> None:
        """Stop following (the thread ends when its stream closes)."""
        with self._lock:
            self._live = False
            self._pid = -2
            stream, self._stream = self._stream, None
        self.forget()
        _close_quietly(stream)

    def _ensure_following(self) -> None:
        if self._pid == os.getpid() or self._pid == -2:
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._live = False
            self._kept.clear()
        threading.Thread(target=self._follow, name="pfbuild-image-events", daemon=True).start()

    def _after_fork(self) -> None:
        # A forked pool child inherits the object but not the thread, nor a lock that
        # thread may have held at the fork: it starts afresh, and follows on first use.
        self._lock = threading.Lock()
        self._live = False
        self._kept.clear()
        self._stream = None
        if self._pid != -2:
            self._pid = -1

    def _follow(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            try:
                stream = self._open_events()
                with self._lock:
                    if self._pid != pid:  # closed while it opened
                        _close_quietly(stream)
                        return
                    self._stream = stream
                    self._generation += 1
                    self._kept.clear()
                    self._live = True
                for _event in stream:
                    self.forget()
            except Exception as exc:  # engine gone or restarting: keep nothing, try again
                log.debug("image event stream ended: %s", exc)
            with self._lock:
                self._live = False
                self._stream = None
            self.forget()
            time.sleep(1.0)


def _close_quietly(stream: Any) -> None:
    if stream is not None and hasattr(stream, "close"):
        try:
            stream.close()
        except Exception:  # closing a broken stream may fail again; it is gone anyway
            log.debug("closing the image event stream failed", exc_info=True)
