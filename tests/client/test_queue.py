"""The queue's shared names: keys, states, and the flight's compare-and-delete."""

from __future__ import annotations

import fakeredis
import pytest

from pfbuild.client.models import JobState
from pfbuild.client.queue import Keys, end_flight, job_state


def test_every_key_is_namespaced() -> None:
    keys = [Keys.flight("p", True, "/r"), Keys.flight("p", False, "/r"),
            Keys.flight("p", False, "/other"), Keys.log("j"), Keys.lock("p"),
            Keys.fence("p"), Keys.cancel("j"), Keys.starts("j")]
    assert all(k.startswith("pfbuild:") for k in keys)
    # a forced flight never shares the unforced one, nor two repositories one flight
    assert len(set(keys)) == len(keys)


def test_a_job_ends_only_its_own_flight() -> None:
    r = fakeredis.FakeRedis()
    key = Keys.flight("p", False, "/r")
    r.set(key, "newer-job")
    assert not end_flight(r, key, "older-job")  # an old job must not end a newer flight
    assert r.get(key) == b"newer-job"
    assert end_flight(r, key, "newer-job")
    assert r.get(key) is None


@pytest.mark.parametrize("state", list(JobState))
def test_each_state_survives_the_celery_round_trip(state: JobState) -> None:
    # QUEUED is stored by Celery as PENDING, which reads back as queued too
    assert job_state(state.celery_state) is state or (
        state is JobState.QUEUED and job_state("PENDING") is state
    )


def test_timed_stages_name_timing_fields() -> None:
    from pfbuild.client.models import Timings

    timed = [s for s in JobState if s.timing]
    assert {s.timing for s in timed} <= set(Timings.model_fields)
    assert JobState.BUILDING.timing == "build" and JobState.SUCCESS.timing is None
