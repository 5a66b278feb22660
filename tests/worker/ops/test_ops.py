"""The operating hooks without a worker: metrics from an answer and a failure, the JSON
stage line, the farm state written to Redis."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import redis

from pfbuild.client.errors import BuildFailed, EngineUnavailable
from pfbuild.client.hosts import HostKeys
from pfbuild.client.models import Actionability, FailureClass, FailureInfo, Publication
from pfbuild.client.queue import Keys
from pfbuild.client.settings import Settings
from pfbuild.worker import oplog
from pfbuild.worker.farm.farmstate import FarmState
from pfbuild.worker.ops import metrics as m
from pfbuild.worker.ops.hooks import observe_answer, observe_failure, observe_publication

_FAILURE = FailureInfo(failure_class=FailureClass.APT_FAILURE,
                       actionability=Actionability.INFRA_ISSUE, remediation="x",
                       retry_on_policy_change=False)


def _sample(name: str, **labels: str) -> float:
    reg = m.registry()
    assert reg is not None
    return reg.get_sample_value(name, labels) or 0.0


def _answer() -> dict[str, Any]:
    return {
        "profile_id": "p1", "cache_source": "built",
        "timings": {"queue_wait": 0.5, "build": 12.0, "load": 0.0, "total": 13.0},
        "attempts": [{"ok": False, "failure": _FAILURE.model_dump(mode="json")}, {"ok": True}],
        "manifest": {"tarball": {"path": "/nonexistent/p1.tar.zst", "size": 1000},
                     "registry": {"reference": "r/p1:latest", "digest": "sha256:x",
                                  "bytes": 700}},
    }


def test_an_answer_and_failures_are_counted() -> None:
    before = _sample("pfbuild_jobs_total", outcome="success", cache_source="built")
    observe_answer(_answer())
    assert _sample("pfbuild_jobs_total", outcome="success", cache_source="built") == before + 1
    assert _sample("pfbuild_stage_seconds_count", stage="build") >= 1
    assert _sample("pfbuild_ladder_retries_total", failure_class="apt_failure") >= 1
    assert _sample("pfbuild_tarball_bytes_total", direction="written") >= 1000
    pushed = _sample("pfbuild_registry_bytes_total", direction="written")
    observe_answer(_answer())
    assert _sample("pfbuild_registry_bytes_total", direction="written") == pushed + 700

    engine_before = _sample("pfbuild_engine_errors_total", error_type="engine_unavailable")
    observe_failure(EngineUnavailable("gone"))
    observe_failure(BuildFailed("no", failure=_FAILURE))
    assert _sample("pfbuild_engine_errors_total", error_type="engine_unavailable") == engine_before + 1
    assert _sample("pfbuild_job_failures_total", error_type="build_failed",
                   failure_class="apt_failure") >= 1


def test_a_stage_line_is_one_json_object() -> None:
    stream = io.StringIO()
    oplog.configure("json")
    handler = oplog.log.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    try:
        oplog.log_stage("job-1", "p1", "host-a", "building")
    finally:
        oplog.configure("text")
    doc = json.loads(stream.getvalue())
    assert {k: doc[k] for k in ("job_id", "profile_id", "host", "stage")} == {
        "job_id": "job-1", "profile_id": "p1", "host": "host-a", "stage": "building"}


def test_farm_state(url: str) -> None:
    r = redis.Redis.from_url(url, decode_responses=True)
    state = FarmState(r, Settings(host_id="h1"))
    state.started("job-1", "p1", "w1:1")
    assert json.loads(r.hget(Keys.running(), "job-1") or "{}")["host"] == "h1"
    assert r.hget(HostKeys.jobs("h1"), "job-1") == "p1"  # what routing counts as busy
    state.failed("job-2", "p2", BuildFailed("no", failure=_FAILURE))
    state.ended("job-1", _answer())
    assert r.hgetall(Keys.running()) == {} and r.hgetall(HostKeys.jobs("h1")) == {}
    assert r.zscore(Keys.uses("h1"), "p1") is not None
    assert r.sismember(HostKeys.images("h1"), "p1")
    assert json.loads(r.lindex(Keys.failures(), 0) or "{}")["failure_class"] == "apt_failure"
    assert r.hgetall(Keys.stats()) == {"source:built": "1", "failure:apt_failure": "1"}
    state.forget_images(["p1"])
    assert r.zscore(Keys.uses("h1"), "p1") is None
    assert not r.sismember(HostKeys.images("h1"), "p1")


def test_farm_state_records_the_code_of_each_answer(url: str) -> None:
    r = redis.Redis.from_url(url, decode_responses=True)
    state = FarmState(r, Settings(host_id="h1"))
    state.ended("job-1", {**_answer(), "image_tag": "patchfoundry/p1:0123456789ab"})
    assert r.zscore(Keys.uses("h1"), "p1:0123456789ab") is not None  # what GC orders by
    assert r.zscore(Keys.uses("h1"), "p1") is not None  # the registry's GC reads profiles
    # what the host holds is read from its engine, never taken from an answer
    assert r.hgetall(HostKeys.codes("h1")) == {}
    r.hset(HostKeys.codes("h1"), "p1:0123456789ab", "sha256:x")  # as a beat would
    state.forget_images([], ["p1:0123456789ab"])  # that code's image went; p1 has others
    assert r.hgetall(HostKeys.codes("h1")) == {}
    assert r.zscore(Keys.uses("h1"), "p1:0123456789ab") is None
    assert r.sismember(HostKeys.images("h1"), "p1")


def test_gc_orders_images_by_the_use_of_their_code() -> None:
    from pfbuild.worker.ops.gc import _last_use

    uses = {"p1": 500.0, "p1:0123456789ab": 300.0}
    # an older tree's image: its own code's last use, not the profile's
    assert _last_use(uses, "p1", ["patchfoundry/p1:0123456789ab"], 100.0) == 300.0
    # an image whose code was never answered here: its creation
    assert _last_use(uses, "p1", ["patchfoundry/p1:abcdefabcdef"], 100.0) == 100.0
    # an image tagged before code tags: the profile's use
    assert _last_use(uses, "p1", ["patchfoundry/p1:latest"], 100.0) == 500.0


def test_publications_are_counted_with_their_seconds_and_bytes() -> None:
    done = _sample("pfbuild_publishes_total", kind="tarball", outcome="done")
    failed = _sample("pfbuild_publishes_total", kind="registry", outcome="failed")
    written = _sample("pfbuild_tarball_bytes_total", direction="written")
    timed = _sample("pfbuild_publish_seconds_count", kind="tarball")
    observe_publication("tarball", Publication(state="done", seconds=9.5, bytes=4096))
    observe_publication("registry", Publication(state="failed", seconds=0.1, reason="down"))
    assert _sample("pfbuild_publishes_total", kind="tarball", outcome="done") == done + 1
    assert _sample("pfbuild_publishes_total", kind="registry", outcome="failed") == failed + 1
    assert _sample("pfbuild_tarball_bytes_total", direction="written") == written + 4096
    assert _sample("pfbuild_publish_seconds_count", kind="tarball") == timed + 1
