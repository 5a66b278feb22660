"""Fault tests on a real redis-server, real `celery worker` processes and the real engine.

Each prints its figure (run with ``-s`` to see them); each uses the defaults a user runs
unless the fault itself needs a setting (said where it is set).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pfbuild.client.errors import JobLost
from pfbuild.client.jobs import BuildClient, BuildJob
from pfbuild.client.queue import JobState, Keys
from pfbuild.client.settings import Settings
from pfbuild.worker.bench.localfarm import RedisServer, Worker
from tests.fakes import drop_image
from tests.fakes import nonce_profile as _profile

pytestmark = [pytest.mark.docker, pytest.mark.redis]

EXAMPLE = Path(__file__).parent.parent.parent / "examples" / "hello"


def _env(url: str, tmp: Path, **extra: str) -> dict[str, str]:
    return {"PFBUILD_REDIS_URL": url, "PFBUILD_TMP_DIR": str(tmp / "pf-tmp"), **extra}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    dest = tmp_path / "hello"
    shutil.copytree(EXAMPLE, dest)
    return dest


@pytest.fixture
def server(docker_engine, tmp_path: Path) -> Iterator[RedisServer]:  # type: ignore[no-untyped-def]
    if shutil.which("redis-server") is None:
        from tests.conftest import missing

        missing("redis-server")
    srv = RedisServer(tmp_path)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        yield started
    finally:
        for w in started:
            w.stop()


def _start(workers: list[Worker], names: list[str], env: dict[str, str], logdir: Path,
           concurrency: int = 1) -> list[Worker]:
    new = [Worker(n, env, logdir, concurrency) for n in names]
    workers.extend(new)
    for w in new:
        w.wait_ready()
    return new


def _until(job: BuildJob, state: JobState, within: float = 180) -> Any:
    deadline = time.monotonic() + within
    while (st := job.status()).state is not state:
        assert time.monotonic() < deadline, st
        assert not st.ready, st
        time.sleep(0.1)
    return st


def _saving(cache_dir: Path, answer: Any, within: float = 120) -> None:
    """Wait until the publisher of ``answer``'s image is saving its tarball: its
    temporary file is there and growing."""
    target = Path(str(answer.manifest.publications["tarball"].target))
    deadline = time.monotonic() + within
    while True:
        temps = [p for p in (cache_dir.iterdir() if cache_dir.is_dir() else [])
                 if p.name.startswith(f".{target.name}.")]
        if temps and temps[0].stat().st_size > 1024 * 1024:
            return
        assert time.monotonic() < deadline and not target.exists(), "no save seen under way"
        time.sleep(0.02)


def _published(job: BuildJob, within: float = 120) -> dict[Any, Any]:
    """The job's publications once none is pending (they follow its answer)."""
    deadline = time.monotonic() + within
    while True:
        found = job.status().publications
        if found and not any(p.state == "pending" for p in found.values()):
            return dict(found)
        assert time.monotonic() < deadline, found
        time.sleep(0.2)


_GHOST = """
import os, signal, sys
from pfbuild.client.jobs import BuildClient
def die(self, *args, **kwargs):
    print(args[2], flush=True)          # the job id, then die between flight and send
    os.kill(os.getpid(), signal.SIGKILL)
BuildClient._send = die
BuildClient(sys.argv[1]).submit({"repo_dir": sys.argv[2], "profile": eval(sys.argv[3])})
"""


def test_submitter_killed_between_flight_and_send(server: RedisServer, workers: list[Worker],
                                                  repo: Path, tmp_path: Path,
                                                  cleanup_images: list[str]) -> None:
    """SIGKILL between claiming the flight and sending: a joiner gets JobLost, and the
    next submit starts a job of its own within ``send_grace`` (default 10 s)."""
    _start(workers, ["g1"], _env(server.url, tmp_path), tmp_path)
    profile = _profile(repo, "true")
    proc = subprocess.run([sys.executable, "-c", _GHOST, server.url, str(repo), repr(profile)],
                          capture_output=True, text=True, timeout=60)
    killed = time.monotonic()
    assert proc.returncode == -9, proc.stderr
    ghost = proc.stdout.strip()
    request = {"repo_dir": str(repo), "profile": profile}
    with BuildClient(server.url) as client:
        joined = client.submit(request)
        assert joined.id == ghost and joined.joined
        with pytest.raises(JobLost):
            joined.result()
        lost_after = time.monotonic() - killed
        while (fresh := client.submit(request)).id == ghost:
            time.sleep(0.2)
        fresh_after = time.monotonic() - killed
        answer = fresh.result(timeout=300)
    cleanup_images.append(answer.image_tag)
    print(f"\nghost flight: joiner got JobLost {lost_after:.1f}s after the kill; a new job "
          f"started {fresh_after:.1f}s after it (bound: send_grace "
          f"{Settings().send_grace:.0f}s); answered from {answer.cache_source}")
    assert answer.cache_source == "built"
    assert fresh_after < Settings().send_grace + 2


def test_redis_wiped_mid_build(server: RedisServer, workers: list[Worker], repo: Path,
                               tmp_path: Path) -> None:
    """FLUSHALL while a build runs: every waiting agent gets JobLost, promptly."""
    _start(workers, ["x1"], _env(server.url, tmp_path), tmp_path)
    request = {"repo_dir": str(repo), "profile": _profile(repo, "sleep 30")}
    outcomes: list[tuple[float, BaseException | None]] = []
    with BuildClient(server.url) as client:
        job = client.submit(request)
        _until(job, JobState.BUILDING)

        def wait() -> None:
            try:
                BuildClient(server.url).job(job.id).result()
                outcomes.append((time.monotonic(), None))
            except BaseException as exc:
                outcomes.append((time.monotonic(), exc))

        waiters = [threading.Thread(target=wait) for _ in range(5)]
        for t in waiters:
            t.start()
        time.sleep(1)
        redis.Redis.from_url(server.url).flushall()
        wiped = time.monotonic()
        for t in waiters:
            t.join(60)
    figures = [at - wiped for at, _ in outcomes]
    print(f"\nRedis wiped: {len(outcomes)} waiters, "
          f"{sum(isinstance(e, JobLost) for _, e in outcomes)} got JobLost, the last "
          f"{max(figures):.2f}s after the wipe (bound: one poll, 0.5 s)")
    assert len(outcomes) == 5 and all(isinstance(e, JobLost) for _, e in outcomes), outcomes
    assert max(figures) < 5


def test_whole_host_killed_mid_build(server: RedisServer, workers: list[Worker], repo: Path,
                                     tmp_path: Path, cleanup_images: list[str]) -> None:
    """SIGKILL the building worker with its pool (its "host"), with the defaults
    (visibility timeout 120 s, lock TTL 60 s): the job comes back on the other worker
    within 3 minutes and is built once more there, to one answer."""
    victim, survivor = _start(workers, ["h1", "h2"], _env(server.url, tmp_path), tmp_path)
    with BuildClient(server.url) as client:
        job = client.submit({"repo_dir": str(repo), "profile": _profile(repo, "sleep 20")})
        st = _until(job, JobState.BUILDING)
        if not str(st.worker).startswith(f"{victim.name}@"):
            victim, survivor = survivor, victim
        victim.kill()
        killed = time.monotonic()
        deadline = killed + 300
        while not str((st := job.status()).worker).startswith(f"{survivor.name}@"):
            assert time.monotonic() < deadline and not st.ready, st
            time.sleep(0.5)
        restarted = time.monotonic() - killed
        answer = job.result(timeout=600)
    cleanup_images.append(answer.image_tag)
    starts = int(redis.Redis.from_url(server.url).get(Keys.starts(job.id)) or 0)
    print(f"\nhost killed mid-build: the job started again on {survivor.name} "
          f"{restarted:.0f}s after the kill (bound 180 s); starts under the lock: {starts}; "
          f"answer from {answer.worker.split('@')[0]}, {answer.cache_source}")
    assert answer.worker.startswith(f"{survivor.name}@") and answer.cache_source == "built"
    assert restarted < 180 and starts == 2


def test_redis_restart_keeps_every_job(docker_engine, tmp_path: Path, workers: list[Worker],  # type: ignore[no-untyped-def]
                                       repo: Path, cleanup_images: list[str]) -> None:
    """Redis (with AOF) restarted mid-build with 10 jobs queued: all 11 answered, none
    cancelled, none built twice."""
    server = RedisServer(tmp_path, persistent=True)
    try:
        _restart_scenario(server, workers, repo, tmp_path, cleanup_images)
    finally:
        server.stop()


def _restart_scenario(server: RedisServer, workers: list[Worker], repo: Path,
                      tmp_path: Path, cleanup_images: list[str]) -> None:
    _start(workers, ["r1"], _env(server.url, tmp_path), tmp_path)
    with BuildClient(server.url) as client:
        first = client.submit({"repo_dir": str(repo), "profile": _profile(repo, "sleep 15")})
        _until(first, JobState.BUILDING)
        queued = [client.submit({"repo_dir": str(repo), "profile": _profile(repo, "true")})
                  for _ in range(10)]
        time.sleep(1.5)  # past one appendfsync everysec
        down = server.restart(down_for=3)
        answers, errors = [], []
        for job in [first, *queued]:
            try:
                answers.append(job.result(timeout=900))
            except Exception as exc:
                errors.append((job.id, exc))
        r = redis.Redis.from_url(server.url)
        starts = [int(r.get(Keys.starts(j.id)) or 0) for j in [first, *queued]]
    cleanup_images.extend(a.image_tag for a in answers)
    print(f"\nRedis restarted (down {down:.1f}s, AOF): {len(answers)}/11 answered, "
          f"errors {[(i[:8], type(e).__name__) for i, e in errors]}, starts per job {starts}")
    assert not errors and len(answers) == 11
    assert all(a.cache_source == "built" for a in answers)
    assert all(s == 1 for s in starts), starts



def test_lock_wait_twice_the_visibility_timeout(server: RedisServer, workers: list[Worker],
                                                repo: Path, tmp_path: Path,
                                                cleanup_images: list[str]) -> None:
    """A forced rebuild waits for a lock held 2 x the visibility timeout (set to 20 s
    here, so that the test takes a minute): it is parked, not retried, so its message is
    never redelivered; each job builds once. Two workers of one slot each."""
    env = _env(server.url, tmp_path, PFBUILD_VISIBILITY_TIMEOUT="20")
    _start(workers, ["l1", "l2"], env, tmp_path)
    profile = _profile(repo, "sleep 45")
    with BuildClient(server.url) as client:
        holder = client.submit({"repo_dir": str(repo), "profile": profile})
        _until(holder, JobState.BUILDING)
        forced = client.submit({"repo_dir": str(repo), "profile": profile,
                                "force_rebuild": True})
        _until(forced, JobState.WAITING_FOR_LOCK, within=60)
        parked_at = time.monotonic()
        a = holder.result(timeout=600)
        b = forced.result(timeout=600)
        waited = b.timings.lock_wait
    cleanup_images.append(a.image_tag)
    r = redis.Redis.from_url(server.url)
    starts = [int(r.get(Keys.starts(j)) or 0) for j in (holder.id, forced.id)]
    logs = "".join(w.log.read_text() for w in workers)
    received = logs.count(f"pfbuild.build[{forced.id}] received")
    print(f"\nlock wait: the forced job waited {waited:.0f}s (visibility timeout 20 s), "
          f"was received {received} times (parked once, woken once), starts {starts}, "
          f"answered {time.monotonic() - parked_at:.0f}s after parking")
    assert waited > 40 and starts == [1, 1] and received == 2
    assert b.cache_source == "built" and b.manifest.force_rebuild


def test_stalled_holder_never_commits_over_a_newer_one(server: RedisServer,
                                                       workers: list[Worker], repo: Path,
                                                       tmp_path: Path,
                                                       cleanup_images: list[str]) -> None:
    """SIGSTOP the holder while it saves its tarball, past its lock's TTL (6 s here, so
    the stop is short); a job of the same profile from another repository takes the lock
    and commits its tarball; then SIGCONT. The stalled holder's fence never appears as a
    committed file, and the cache ends with the highest fence's tarball only."""
    env = _env(server.url, tmp_path, PFBUILD_LOCK_TTL="6")
    _start(workers, ["s1", "s2"], env, tmp_path)
    cache_dir = tmp_path / "shared-cache"
    other = tmp_path / "other"
    shutil.copytree(repo, other)
    (other / "extra.txt").write_text("another tree, the same profile\n")
    profile = _profile(repo, "true")
    seen: set[str] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if cache_dir.is_dir():
                seen.update(n for n in os.listdir(cache_dir) if not n.startswith("."))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with BuildClient(server.url) as client:
        first = client.submit({"repo_dir": str(repo), "profile": profile,
                               "image_cache_dir": str(cache_dir)})
        answered = first.result(timeout=600)  # its tarball follows the answer
        stalled_fence = int(str(answered.manifest.publications["tarball"].target)
                            .rsplit("+f", 1)[1].split(".")[0])
        _saving(cache_dir, answered)
        holder = next(w for w in workers if answered.worker.startswith(f"{w.name}@"))
        os.killpg(holder.proc.pid, signal.SIGSTOP)  # its publisher and its consumer
        try:
            time.sleep(8)  # past the TTL: the lock is free
            second = client.submit({"repo_dir": str(other), "profile": profile,
                                    "image_cache_dir": str(cache_dir)})
            newer = second.result(timeout=600)
            _published(second)
        finally:
            os.killpg(holder.proc.pid, signal.SIGCONT)
        time.sleep(3)  # the stalled publisher goes on, finds its lock gone, and stops
    stop.set()
    watcher.join(5)
    cleanup_images.append(newer.image_tag)
    from pfbuild.worker import layout

    fences = [f for f, _ in layout.fenced_tarballs(cache_dir, newer.profile_id)]
    stalled_name = layout.tarball_name(newer.profile_id, stalled_fence)
    print(f"\nstalled holder: fence {stalled_fence} stopped saving its tarball for 8 s "
          f"(TTL 6 s); newer holder committed fence {fences}; "
          f"the stalled fence's file seen: {stalled_name in seen}; files at the end: "
          f"{sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith('.'))}")
    assert stalled_name not in seen
    assert len(fences) == 1 and fences[0] > stalled_fence


def test_full_disk_during_the_tarball_save(server: RedisServer, workers: list[Worker],
                                           repo: Path, tmp_path: Path,
                                           cleanup_images: list[str]) -> None:
    """The cache folder is a 16 MiB tmpfs: the save runs out of space. The build answers
    first (its tarball pending), then its publication says the tarball was not saved and
    why, and the folder holds no torn tarball, no checksum and no temporary file. (That
    an older tarball and its checksum stay paired is tests/worker/test_fenced_commit.py's,
    with a failing fsync.)"""
    small = tmp_path / "small-disk"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        from tests.conftest import missing

        missing("a tmpfs mount (root)")
    try:
        _start(workers, ["d1"], _env(server.url, tmp_path), tmp_path)
        with BuildClient(server.url) as client:
            job = client.submit({"repo_dir": str(repo), "profile": _profile(repo, "true"),
                                 "image_cache_dir": str(small)})
            answer = job.result(timeout=600)
            cleanup_images.append(answer.image_tag)
            assert answer.manifest.publications["tarball"].state == "pending"
            published = _published(job)
        left = sorted(p.name for p in small.iterdir())
        on_disk = json.loads(Path(answer.manifest_path).read_text())
        events = [e for e in on_disk["events"] if "tarball not saved" in e]
        print(f"\nfull disk: answer {answer.cache_source}, then the tarball "
              f"{published['tarball'].state}: {published['tarball'].reason}; "
              f"event {events}; files left {left}")
        assert answer.cache_source == "built" and published["tarball"].state == "failed"
        assert "No space left" in str(published["tarball"].reason) and events
        assert on_disk["tarball"] is None and left == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_cancel_mid_build_in_every_pool(server: RedisServer, workers: list[Worker], repo: Path,
                                        tmp_path: Path, docker_engine, pool: str) -> None:  # type: ignore[no-untyped-def]
    """Cancel a building job joined by three agents: the engine's build container is gone
    within 5 s, every agent gets JobCancelled, and no answer lands over it."""
    import docker

    from pfbuild.client.errors import JobCancelled

    workers.append(Worker(f"c-{pool}", _env(server.url, tmp_path), tmp_path, pool=pool))
    workers[-1].wait_ready()
    marker = f"sleep 90.{uuid.uuid4().int % 10**6}"
    request = {"repo_dir": str(repo), "profile": _profile(repo, marker)}
    api = docker.from_env()

    def build_containers() -> list[Any]:
        # One list call (no per-container inspect): a container removed between the list
        # and its inspect would otherwise raise NotFound here.
        return [c for c in api.api.containers(all=True) if marker in c.get("Command", "")]

    outcomes: list[BaseException | None] = []
    with BuildClient(server.url) as client:
        jobs = [client.submit(request) for _ in range(3)]
        assert len({j.id for j in jobs}) == 1
        deadline = time.monotonic() + 180
        while not build_containers():
            assert time.monotonic() < deadline and not jobs[0].status().ready
            time.sleep(0.2)

        def wait(job: BuildJob) -> None:
            try:
                job.result(timeout=120)
                outcomes.append(None)
            except BaseException as exc:
                outcomes.append(exc)

        waiters = [threading.Thread(target=wait, args=(j,)) for j in jobs]
        for t in waiters:
            t.start()
        jobs[1].cancel()  # any agent of the flight
        cancelled = time.monotonic()
        while build_containers():
            assert time.monotonic() - cancelled < 30, "the build container lives on"
            time.sleep(0.1)
        gone = time.monotonic() - cancelled
        for t in waiters:
            t.join(30)
        time.sleep(5)  # a build that went on would answer by now (and overwrite)
        final = jobs[0].status().state
    tag = f"patchfoundry/{jobs[0].profile_id}:latest"
    print(f"\ncancel on {pool}: build container gone {gone:.1f}s after cancel(); "
          f"{sum(isinstance(o, JobCancelled) for o in outcomes)}/3 agents got JobCancelled; "
          f"state 5 s later: {final.value}; image made: {docker_engine.inspect(tag) is not None}")
    assert gone < 5
    assert len(outcomes) == 3 and all(isinstance(o, JobCancelled) for o in outcomes), outcomes
    assert final is JobState.CANCELLED and docker_engine.inspect(tag) is None


def test_engine_down_on_the_only_host(server: RedisServer, workers: list[Worker], repo: Path,
                                      tmp_path: Path) -> None:
    """The only host's engine does not answer (its socket is gone): the agent gets
    EngineUnavailable within 10 s, not a hang or a generic error."""
    from pfbuild.client.errors import EngineUnavailable

    env = _env(server.url, tmp_path, PFBUILD_DOCKER_HOST=f"unix://{tmp_path}/stopped.sock")
    _start(workers, ["e1"], env, tmp_path)
    with BuildClient(server.url) as client:
        started = time.monotonic()
        job = client.submit({"repo_dir": str(repo), "profile": _profile(repo, "true")})
        with pytest.raises(EngineUnavailable) as info:
            job.result(timeout=60)
        took = time.monotonic() - started
    print(f"\nengine down: EngineUnavailable {took:.2f}s after the submit: "
          f"{info.value.message[:60]}")
    assert took < 10



def _send_to(client: BuildClient, request: dict[str, Any], queue: str) -> BuildJob:
    """Send ``request`` straight to ``queue``, as a routing decision made elsewhere would."""
    from pfbuild.client.queue import TASK_NAME, mark_sent

    req, profile_id = client._prepare(request)
    job_id = str(uuid.uuid4())
    client.app.send_task(TASK_NAME, task_id=job_id, queue=queue, kwargs={
        "request": req.model_dump(mode="json"), "profile_id": profile_id,
        "submitted_at": time.time()})
    mark_sent(client.redis, job_id, client.settings)  # it exists: waiters wait
    return BuildJob(client, job_id, profile_id)


def test_engine_down_on_one_of_two_hosts(server: RedisServer, workers: list[Worker],
                                         repo: Path, tmp_path: Path,
                                         cleanup_images: list[str]) -> None:
    """Host B's engine is stopped (its socket is gone), host A's answers: no job fails.
    New profiles and hits sent to B's own queue, to the shared queue (which B consumes
    until its heartbeat sees A answer) and through routing are all answered by A, those B
    took after a hand-back."""
    from pfbuild.client.hosts import host_queue, list_hosts
    from pfbuild.client.queue import QUEUE

    stopped = f"unix://{tmp_path}/stopped.sock"
    _start(workers, ["host-a"], _env(server.url, tmp_path, PFBUILD_HOST_ID="host-a"),
           tmp_path, concurrency=2)
    (host_b,) = _start(workers, ["host-b"], _env(server.url, tmp_path, PFBUILD_HOST_ID="host-b",
                                                 PFBUILD_DOCKER_HOST=stopped), tmp_path,
                       concurrency=2)
    with BuildClient(server.url) as client:
        hosts = {h.host_id: h for h in list_hosts(client.redis)}
        assert hosts["host-b"].alive and hosts["host-b"].engine_ok is False, hosts
        requests = [{"repo_dir": str(repo), "profile": _profile(repo, "true")}
                    for _ in range(6)]
        started = time.monotonic()
        jobs = [_send_to(client, r, host_queue("host-b")) for r in requests[:2]]
        jobs += [_send_to(client, r, QUEUE) for r in requests[2:4]]
        jobs += [client.submit(r) for r in requests[4:]]  # routing: never to B
        waits: list[float] = []
        answers = [j.result(timeout=600) for j in jobs]
        waits.append(time.monotonic() - started)
        while b"Canceling queue pfbuild" not in host_b.log.read_bytes():  # B's next beats
            assert time.monotonic() - started < 600, host_b.log.read_text()[-3000:]
            time.sleep(0.2)
        hits_at = time.monotonic()  # the same profiles again: hits, held by A only
        jobs = [_send_to(client, requests[0], host_queue("host-b")),
                _send_to(client, requests[2], QUEUE), client.submit(requests[4])]
        answers += [j.result(timeout=600) for j in jobs]
        waits.append(time.monotonic() - hits_at)
    cleanup_images.extend(a.image_tag for a in answers)
    handed = [a for a in answers if any("handed to host host-a" in e
                                        for e in a.manifest.events)]
    print(f"\nengine down on host B: {len(answers)}/{len(answers)} jobs answered "
          f"({sum(a.cache_source == 'built' for a in answers)} built, "
          f"{sum(a.cache_source == 'local' for a in answers)} hits), {len(handed)} went to "
          f"host A after being handed back, longest wait {max(waits):.1f} s (6 builds), "
          f"{waits[1]:.2f} s (3 hits)")
    assert {a.docker_host for a in answers} == {"host-a"}
    assert len(handed) >= 3  # at least those sent to B's own queue
    assert sorted(a.cache_source for a in answers[6:]) == ["local"] * 3
    assert answers[7] not in handed  # sent to the shared queue once B stopped taking it

def test_an_engine_that_dies_mid_build_hands_the_job_on(server: RedisServer,
                                                       workers: list[Worker], repo: Path,
                                                       tmp_path: Path, docker_engine,  # type: ignore[no-untyped-def]
                                                       cleanup_images: list[str]) -> None:
    """Host B's engine vanishes while B builds (every connection to it dropped, the socket
    gone): the job is not failed but handed to host A, which builds it; one answer."""
    from pfbuild.client.hosts import host_queue
    from tests.hostsupport import engine_proxy

    with engine_proxy(docker_engine) as proxy:
        _start(workers, ["host-a"], _env(server.url, tmp_path, PFBUILD_HOST_ID="host-a"),
               tmp_path)
        _start(workers, ["host-b"], _env(server.url, tmp_path, PFBUILD_HOST_ID="host-b",
                                         PFBUILD_DOCKER_HOST=proxy.url), tmp_path)
        with BuildClient(server.url) as client:
            request = {"repo_dir": str(repo), "profile": _profile(repo, "sleep 20")}
            job = _send_to(client, request, host_queue("host-b"))
            status = _until(job, JobState.BUILDING)
            assert status.docker_host == "host-b", status
            time.sleep(2)  # into the build's RUN step
            proxy.kill()
            killed = time.monotonic()
            answer = job.result(timeout=600)
            took = time.monotonic() - killed
            starts = int(redis.Redis.from_url(server.url).get(Keys.starts(job.id)) or 0)
    cleanup_images.append(answer.image_tag)
    handed = [e for e in answer.manifest.events if "handed to host host-a" in e]
    print(f"\nengine died mid-build on host B: answered by {answer.docker_host} "
          f"({answer.cache_source}) {took:.1f}s after the engine vanished; starts under "
          f"the lock: {starts}; events: {handed}")
    assert answer.docker_host == "host-a" and answer.cache_source == "built"
    assert handed and starts == 2


def test_a_job_parked_on_a_dead_holders_lock_is_woken(server: RedisServer,
                                                      workers: list[Worker], repo: Path,
                                                      tmp_path: Path,
                                                      cleanup_images: list[str]) -> None:
    """The lock's holder dies with its host while a forced rebuild is parked on the lock:
    nobody releases it, so the surviving worker's sweep wakes the parked job once the
    lock's TTL (6 s here) has run out, and it builds."""
    env = _env(server.url, tmp_path, PFBUILD_LOCK_TTL="6", PFBUILD_VISIBILITY_TIMEOUT="30")
    w1, w2 = _start(workers, ["p1", "p2"], env, tmp_path)
    profile = _profile(repo, "sleep 60")
    with BuildClient(server.url) as client:
        holder = client.submit({"repo_dir": str(repo), "profile": profile})
        st = _until(holder, JobState.BUILDING)
        victim = w1 if str(st.worker).startswith("p1@") else w2
        forced = client.submit({"repo_dir": str(repo), "profile": profile,
                                "force_rebuild": True})
        _until(forced, JobState.WAITING_FOR_LOCK, within=60)
        victim.kill()
        killed = time.monotonic()
        while (fst := forced.status()).state is JobState.WAITING_FOR_LOCK:
            assert time.monotonic() - killed < 60, fst
            time.sleep(0.2)
        woken = time.monotonic() - killed
        answer = forced.result(timeout=600)
        first = holder.result(timeout=600)
    cleanup_images.append(answer.image_tag)
    print(f"\nparked on a dead holder's lock: woken {woken:.1f}s after the kill (lock TTL "
          f"6 s, sweep every 2 s); forced job {answer.cache_source}; the holder's job came "
          f"back and answered from {first.cache_source}")
    assert answer.cache_source == "built" and woken < 6 + 2 + 5


def test_worker_killed_mid_publish(server: RedisServer, workers: list[Worker], repo: Path,
                                   tmp_path: Path, docker_engine,  # type: ignore[no-untyped-def]
                                   cleanup_images: list[str]) -> None:
    """SIGKILL the worker (with its pool) while it saves the tarball of the profile it
    has just answered: no tarball is committed, torn or whole. Submitted again to the
    next worker, the profile is a hit at once, and the publication it finds abandoned is
    finished there (here by the sweep, once the dead publisher's lock has expired): the
    tarball lands whole (its sidecar's sha256, then a load after `docker rmi` that gives
    back the same image id), from the one build there was."""
    from pfbuild.worker import layout
    from pfbuild.worker.caches.tarball import find_tarball
    from tests.hostsupport import BuildCounter, index_holds

    # the dead publisher's profile lock expires after 10 s (not the default 60 s), and the
    # sweep looks every 2 s (not 30 s), to keep the test short
    env = _env(server.url, tmp_path, PFBUILD_LOCK_TTL="10", PFBUILD_PUBLISH_SWEEP_SECONDS="2")
    [victim] = _start(workers, ["p1"], env, tmp_path)
    cache = tmp_path / "cache"
    request = {"repo_dir": str(repo), "profile": _profile(repo, "true"),
               "image_cache_dir": str(cache)}
    with BuildCounter(docker_engine) as counter, BuildClient(server.url) as client:
        first = client.submit(request).result(timeout=600)
        cleanup_images.append(first.image_tag)
        _saving(cache, first)
        victim.kill()
        killed = time.monotonic()
        assert layout.fenced_tarballs(cache, first.profile_id) == []  # nothing committed
        _start(workers, ["p2"], env, tmp_path)
        again_job = client.submit(request)
        again = again_job.result(timeout=120)
        answered_in = time.monotonic() - killed
        # a niced save of the whole image (hundreds of MB) on a loaded 2-core machine can
        # take minutes: the bound is for "finished", not for how soon
        deadline = time.monotonic() + 600
        while (found := find_tarball(cache, first.profile_id)) is None or \
                not found.with_name(found.name + ".sha256").exists():
            assert time.monotonic() < deadline, "the publication was never finished"
            time.sleep(0.5)
        landed_in = time.monotonic() - killed
        sidecar = found.with_name(found.name + ".sha256").read_text().split()[0]
        import hashlib

        with open(found, "rb") as fh:
            whole = hashlib.file_digest(fh, "sha256").hexdigest() == sidecar
        drop_image(docker_engine, first.image_tag)
        # hosts read the removal from their engine's events (docs/design.md, "What a hit
        # means"): a submit before they have may still be answered as a hit
        member = f"{first.profile_id}:{first.image_tag.rpartition(':')[2]}"
        index_holds(server.url, member, None)
        reloaded = client.submit(request).result(timeout=300)
        time.sleep(1)  # the last events
    builds = counter.builds[first.profile_id]
    print(f"\nworker killed mid-publish: submitted again, answered from {again.cache_source} "
          f"{answered_in:.1f}s after the kill; the tarball landed {landed_in:.1f}s after it "
          f"(lock TTL 10 s, sweep 2 s), whole: {whole}; after rmi: {reloaded.cache_source}; "
          f"builds: {builds}")
    assert again.cache_source == "local" and again.image_id == first.image_id
    assert whole and reloaded.cache_source == "tarball"
    assert reloaded.image_id == first.image_id and builds == 1
