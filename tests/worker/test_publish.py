"""Publishing after the answer (worker/publish.py), on the fake engine: the record, the
publish lock, a publication handed on, and one a publisher that died left pending."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pfbuild.client.settings import Settings
from pfbuild.worker import publish
from pfbuild.worker.build.resolve import resolve_request
from pfbuild.worker.pipeline import reuse_local, run_build
from pfbuild.worker.publish import Pending
from tests.fakes import FakeEngine

PROFILE = {"install_cmds": ["pip install ."], "env": {"A": "1"}}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copytree(Path(__file__).parents[2] / "examples" / "hello", tmp_path / "repo")
    return tmp_path / "repo"


def _resolved(repo: Path, settings: Settings):  # type: ignore[no-untyped-def]
    from pfbuild.client.profile import validate_request

    return resolve_request(validate_request({"repo_dir": str(repo), "profile": PROFILE},
                                            settings), settings)


def test_a_new_image_answers_with_its_publication_pending(repo: Path,
                                                          settings: Settings) -> None:
    """With a handoff, the answer goes out before the tarball: pending in the answer and
    the record, the publish lock handed on; publishing lands it and brings the manifest,
    the record and the metric's observers up to date."""
    engine, handed = FakeEngine(), list[Pending]()
    answer = run_build(_resolved(repo, settings), settings, engine, fence=7,
                       handoff=handed.append)
    assert answer.cache_source == "built" and answer.manifest.tarball is None
    tarball = answer.manifest.publications["tarball"]
    assert tarball.state == "pending" and tarball.target and tarball.target.endswith("+f7.tar.zst")
    assert not Path(tarball.target).exists() and engine.saves == 0
    [pending] = handed
    assert isinstance(pending, Pending)
    record = publish.current(settings, answer.profile_id)
    assert record is not None and record.pending and record.spec.image_id == answer.image_id
    # the publish lock is held: nobody else may take the publication over
    assert publish.claim(settings, record) is None
    seen: list[tuple[str, str]] = []
    publish.observe(lambda kind, pub: seen.append((kind, pub.state)))
    try:
        publish.publish(pending, engine, settings)
    finally:
        pending.release()
        publish._observers.pop()
    assert Path(tarball.target).is_file() and seen == [("tarball", "done")]
    on_disk = json.loads(Path(answer.manifest_path).read_text())
    assert on_disk["publications"]["tarball"]["state"] == "done"
    assert on_disk["tarball"]["path"] == tarball.target
    assert any("tarball save done" in e for e in on_disk["events"])
    finished = publish.current(settings, answer.profile_id)
    assert finished is not None and not finished.pending
    # a later hit says what is published of the image
    hit = reuse_local(_resolved(repo, settings), settings, engine)
    assert hit is not None and hit.manifest.publications["tarball"].state == "done"


def test_without_a_handoff_the_publication_runs_before_the_answer(repo: Path,
                                                                   settings: Settings) -> None:
    """`pfbuild build` (no queue): the seed's contract, the tarball before the answer."""
    answer = run_build(_resolved(repo, settings), settings, FakeEngine())
    assert answer.manifest.tarball is not None and Path(answer.manifest.tarball.path).is_file()
    assert answer.manifest.publications["tarball"].state == "done"
    assert answer.timings.save > 0


def test_a_publication_whose_publisher_died_is_taken_over_by_the_next_hit(
    repo: Path, settings: Settings
) -> None:
    """The publisher died (its lock released with it, its record still pending): the next
    hit of the same image answers at once and hands the publication on; while a
    publisher holds the lock, a hit only reports it pending."""
    engine, handed = FakeEngine(), list[Pending]()
    answer = run_build(_resolved(repo, settings), settings, engine, handoff=handed.append)
    [first] = handed
    alive, taken = list[Pending](), list[Pending]()
    hit = reuse_local(_resolved(repo, settings), settings, engine, handoff=alive.append)
    assert hit is not None and hit.cache_source == "local" and alive == []
    assert hit.manifest.publications["tarball"].state == "pending"
    first.release()  # the publisher dies: the kernel drops its lock
    hit = reuse_local(_resolved(repo, settings), settings, engine, handoff=taken.append)
    assert hit is not None and hit.cache_source == "local" and engine.saves == 0
    [pending] = taken
    assert pending.spec.image_id == answer.image_id
    try:
        publish.publish(pending, engine, settings)
    finally:
        pending.release()
    done = publish.current(settings, answer.profile_id)
    assert done is not None and done.publications["tarball"].state == "done"
    assert engine.saves == 1 and Path(str(done.publications["tarball"].target)).is_file()


def test_a_run_of_the_profile_waits_for_its_running_publication(repo: Path,
                                                               settings: Settings) -> None:
    """A rebuild takes the publish lock first: it never saves over a publication running
    on this host; and a run that finds the image with its publication abandoned finishes
    it before answering (no handoff)."""
    engine, handed = FakeEngine(), list[Pending]()
    run_build(_resolved(repo, settings), settings, engine, handoff=handed.append)
    [pending] = handed
    lock = publish.lock_of(settings, pending.spec.profile_id)
    assert not lock.acquire(blocking=False)  # held by the publication handed on
    pending.release()
    again = run_build(_resolved(repo, settings), settings, engine)
    assert again.cache_source == "local" and engine.saves == 1
    assert again.manifest.publications["tarball"].state == "done"
    assert any("publisher that died" in e for e in again.manifest.events)


def test_a_publication_the_disk_refuses_fails_with_its_reason(repo: Path,
                                                              settings: Settings) -> None:
    engine, handed = FakeEngine(), list[Pending]()
    answer = run_build(_resolved(repo, settings), settings, engine, handoff=handed.append)
    [pending] = handed
    engine.save_error = OSError(28, "No space left on device")
    try:
        publish.publish(pending, engine, settings)
    finally:
        pending.release()
    record = publish.current(settings, answer.profile_id)
    assert record is not None and record.publications["tarball"].state == "failed"
    assert "No space left" in str(record.publications["tarball"].reason)
    assert not list(Path(pending.spec.cache_dir).glob("*.tar.zst"))
    on_disk = json.loads(Path(answer.manifest_path).read_text())
    assert any("tarball not saved" in e for e in on_disk["events"])
