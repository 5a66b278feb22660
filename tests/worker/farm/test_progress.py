"""The reporter: stage changes at once, lines throttled, a lost lock stops the build."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pfbuild.client.models import JobState
from pfbuild.client.queue import Keys
from pfbuild.client.settings import Settings
from pfbuild.worker.farm.progress import Reporter


class _Task:
    def __init__(self, job_id: str = "job1") -> None:
        self.updates: list[tuple[str, dict[str, Any]]] = []
        self.request = SimpleNamespace(id=job_id)

    def update_state(self, task_id: str, state: str, meta: dict[str, Any]) -> None:
        assert task_id == self.request.id  # by id: a timer thread has no task context
        self.updates.append((state, meta))


def test_reporter_publishes_stage_changes_and_throttles_lines() -> None:
    import fakeredis

    r = fakeredis.FakeRedis()
    task = _Task()
    rep = Reporter(task, r, Settings(), {"profile_id": "p"})  # type: ignore[arg-type]
    rep(JobState.RENDERING)
    rep(JobState.BUILDING, step=1, steps=3, line="Step 1/3 : FROM x")
    for i in range(100):
        rep(JobState.BUILDING, step=2, steps=3, line=f"line {i}")
    rep(JobState.SAVING_TARBALL)
    states = [s for s, _ in task.updates]
    assert states == ["RENDERING", "BUILDING", "SAVING_TARBALL"]
    assert task.updates[1][1]["step"] == 1 and task.updates[1][1]["profile_id"] == "p"
    assert r.llen(Keys.log("job1")) == 101  # every line kept, though few were published


def test_reporter_stops_a_build_whose_lock_is_gone() -> None:
    import fakeredis

    from pfbuild.client.errors import LockLost

    def lost() -> None:
        raise LockLost("gone")

    rep = Reporter(_Task(), fakeredis.FakeRedis(), Settings(), {}, guard=lost)  # type: ignore[arg-type]
    with pytest.raises(LockLost):
        rep(JobState.BUILDING, line="x")


def test_a_build_that_goes_quiet_still_shows_its_last_step_and_lines() -> None:
    import time

    import fakeredis

    r = fakeredis.FakeRedis()
    task = _Task("job9")
    rep = Reporter(task, r, Settings(), {})  # type: ignore[arg-type]
    rep(JobState.BUILDING)
    for i in range(1, 14):  # every cached step at once, then a long silent RUN
        rep(JobState.BUILDING, step=i, steps=13, line=f"Step {i}/13 : ...")
    deadline = time.monotonic() + 5
    while task.updates[-1][1].get("step") != 13:
        assert time.monotonic() < deadline, task.updates
        time.sleep(0.05)
    assert r.llen(Keys.log("job9")) == 13  # and the lines reached `pfbuild logs`
    rep.close()
    time.sleep(0.6)
    rep(JobState.BUILDING, step=1, steps=13, line="late")
    time.sleep(0.6)
    assert task.updates[-1][1].get("step") == 13  # nothing is published after close
