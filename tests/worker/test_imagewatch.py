"""What a worker keeps of its inspects: kept while the engine's image events say nothing
changed, forgotten on any event, on its own changes, when the stream breaks, with age."""

from __future__ import annotations

import os
import queue
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pfbuild.worker.engine import DockerEngine, ImageInfo
from pfbuild.worker.imagewatch import ImageWatch
from tests.conftest import BASE_IMAGE

_END = object()


class _Events:
    """An event stream fed by the test; ``break_()`` ends it as a dropped connection."""

    def __init__(self) -> None:
        self.opened = 0
        self.feed: queue.Queue[Any] = queue.Queue()

    def open(self) -> Iterator[Any]:
        self.opened += 1
        return self._stream()

    def _stream(self) -> Iterator[Any]:
        while (item := self.feed.get()) is not _END:
            yield item

    def send(self, event: dict[str, str]) -> None:
        self.feed.put(event)

    def break_(self) -> None:
        self.feed.put(_END)


def _until(what: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _live_watch(events: _Events, max_age: float = 30) -> ImageWatch[str]:
    watch: ImageWatch[str] = ImageWatch(events.open, max_age=max_age)
    assert watch.get("t") is None  # starts following; nothing kept before it is live

    def kept() -> bool:
        watch.keep("t", "probe", watch.generation())
        return watch.get("t") == "probe"

    _until(kept)
    watch.forget()
    return watch


def test_an_answer_is_kept_until_any_image_event() -> None:
    events = _Events()
    watch = _live_watch(events)
    watch.keep("t", "image-1", watch.generation())
    assert watch.get("t") == "image-1"
    events.send({"Action": "untag", "id": "sha256:other"})  # any image event, anyone's
    _until(lambda: watch.get("t") is None)
    watch.close()


def test_an_inspect_that_overlaps_a_change_is_not_kept() -> None:
    watch = _live_watch(_Events())
    generation = watch.generation()  # an inspect starts...
    watch.forget()  # ...the engine changes (an event, or this process's own change)...
    watch.keep("t", "stale", generation)  # ...and its answer arrives
    assert watch.get("t") is None
    watch.close()


def test_a_broken_stream_keeps_nothing_until_it_is_back() -> None:
    events = _Events()
    watch = _live_watch(events)
    watch.keep("t", "image-1", watch.generation())
    events.break_()
    _until(lambda: watch.get("t") is None)
    watch.keep("t", "image-1", watch.generation())  # not live (it waits 1 s): refused
    assert watch.get("t") is None
    _until(lambda: events.opened == 2)  # it reconnects on its own
    watch.close()


def test_an_answer_older_than_max_age_is_asked_again() -> None:
    watch = _live_watch(_Events(), max_age=0.2)
    watch.keep("t", "image-1", watch.generation())
    assert watch.get("t") == "image-1"
    time.sleep(0.3)
    assert watch.get("t") is None
    watch.close()


def test_a_forked_child_keeps_nothing_of_its_parent_and_follows_on_its_own() -> None:
    """A pool child forked while the parent follows: no inherited answers, no inherited
    lock, its own stream."""
    events = _Events()
    watch = _live_watch(events)
    watch.keep("t", "parent's", watch.generation())
    with watch._lock:  # the parent's thread holds the lock at the fork
        child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            if watch.get("t") is None:
                watch.keep("t", "child's", watch.generation())
                _until(lambda: _kept(watch, "child's"), seconds=10)
                code = 0 if events.opened == 2 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert watch.get("t") == "parent's"
    watch.close()


def _kept(watch: ImageWatch[str], value: str) -> bool:
    watch.keep("t", value, watch.generation())
    return watch.get("t") == value


@pytest.mark.docker
def test_a_real_engine_keeps_a_tag_and_sees_it_move(docker_engine, unique_tag: str) -> None:  # type: ignore[no-untyped-def]
    """Inspects answer from memory; a tag moved by someone else (the docker CLI) is seen
    through the events, and one moved by this engine object at once."""
    tag = f"pfwatch/{unique_tag}:latest"
    engine = DockerEngine(docker_engine.host, timeout=60)
    engine.follow_images(max_age=60)
    base = engine.inspect(BASE_IMAGE)
    assert base is not None
    engine.tag(BASE_IMAGE, tag)
    try:
        first = _kept_inspect(engine, tag)
        assert first.id == base.id
        calls = _count_inspects(engine)
        assert engine.inspect(tag) == first and calls() == 0  # from memory
        # someone else moves the tag: a labelled child of the base
        build = subprocess.run(
            ["docker", "build", "-q", "-t", tag, "--label", f"moved={unique_tag}", "-"],
            input=f"FROM {BASE_IMAGE}\n".encode(), capture_output=True, check=True,
        )
        moved = build.stdout.decode().strip()
        _until(lambda: (i := engine.inspect(tag)) is not None and i.id == moved)
        engine.tag(BASE_IMAGE, tag)  # this object moves it back: seen at once
        again = engine.inspect(tag)
        assert again is not None and again.id == base.id
    finally:
        engine.remove(tag)
        assert engine.inspect(tag) is None
        if engine.watch is not None:
            engine.watch.close()


def _kept_inspect(engine: DockerEngine, tag: str) -> ImageInfo:
    """Inspect until the answer is kept (the event stream connects in the background)."""
    assert engine.watch is not None
    watch = engine.watch
    _until(lambda: engine.inspect(tag) is not None and watch.get(tag) is not None)
    info = watch.get(tag)
    assert info is not None
    return info


def _count_inspects(engine: DockerEngine) -> Callable[[], int]:
    """From now on, count the inspects that reach the engine."""
    calls = 0
    real = engine.api.inspect_image

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    engine.api.inspect_image = counting
    return lambda: calls
