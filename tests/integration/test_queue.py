"""The farm for real: redis-server, two `celery worker` processes, the Docker engine."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from pfbuild.client.errors import BadRequest, PfbuildError
from pfbuild.client.jobs import BuildClient
from pfbuild.client.queue import JobState, Keys
from pfbuild.client.settings import Settings
from pfbuild.worker.bench.localfarm import RedisServer, Worker
from tests.fakes import drop_image
from tests.fakes import nonce_profile as _profile

pytestmark = [pytest.mark.docker, pytest.mark.redis]

ORDER = [s.value for s in JobState]


@pytest.fixture(scope="module")
def farm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("farm")


def _env(url: str, tmp: Path, hard_limit: int = 300) -> dict[str, str]:
    return {
        "PFBUILD_REDIS_URL": url,
        "PFBUILD_TMP_DIR": str(tmp / "pf-tmp"),
        "PFBUILD_LOCK_TTL": "6",
        "PFBUILD_LOCK_POLL_SECONDS": "0.5",
        "PFBUILD_BUILD_SOFT_TIME_LIMIT": str(hard_limit - 10),
        "PFBUILD_BUILD_TIME_LIMIT": str(hard_limit),
        # a dead worker's job is redelivered after 30 s, not the default 120 s
        "PFBUILD_VISIBILITY_TIMEOUT": "30",
    }


@pytest.fixture(scope="module")
def farm(docker_engine, farm_dir: Path) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    if shutil.which("redis-server") is None:
        from tests.conftest import missing

        missing("redis-server")
    server = RedisServer(farm_dir)
    workers = [Worker(f"w{i}", _env(server.url, farm_dir), farm_dir) for i in (1, 2)]
    try:
        for w in workers:
            w.wait_ready()
        yield {"url": server.url, "workers": workers, "dir": farm_dir}
    finally:
        for w in workers:
            w.stop()
        server.stop()


@pytest.fixture
def repo(farm: dict[str, Any], tmp_path: Path) -> Path:
    dest = tmp_path / "hello"
    shutil.copytree(Path(__file__).parent.parent.parent / "examples" / "hello", dest)
    return dest


def _submit_and_wait(url: str, request: dict[str, Any]) -> tuple[str, str]:
    with BuildClient(url) as client:
        job = client.submit(request)
        return job.id, job.result(timeout=600).image_id


def _in_process(url: str, request: dict[str, Any], out: Any) -> None:
    out.put(_submit_and_wait(url, request))


def test_fifty_concurrent_submits_cause_one_build(farm: dict[str, Any], repo: Path,
                                                  cleanup_images: list[str]) -> None:
    request = {"repo_dir": str(repo), "profile": _profile(repo)}
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_in_process, args=(farm["url"], request, out))
             for _ in range(25)]
    with ThreadPoolExecutor(25) as pool:
        for p in procs:
            p.start()
        threads = [pool.submit(_submit_and_wait, farm["url"], request) for _ in range(25)]
        results = [f.result(timeout=600) for f in threads]
        results += [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(10)
    job_ids = {job for job, _ in results}
    image_ids = {image for _, image in results}
    assert len(results) == 50
    assert len(job_ids) == 1 and len(image_ids) == 1
    (job_id,) = job_ids
    r = redis.Redis.from_url(farm["url"])
    assert int(r.get(Keys.starts(job_id)) or 0) == 1  # one execution on one worker
    with BuildClient(farm["url"]) as client:
        answer = client.job(job_id).result(timeout=5)
    cleanup_images.append(answer.image_tag)
    assert answer.cache_source == "built"
    # the flight is over: a new submit is a new job, answered from the cache
    with BuildClient(farm["url"]) as client:
        again = client.submit(request)
        assert again.id != job_id and not again.joined
        assert again.result(timeout=120).cache_source == "local"


def test_states_are_seen_in_order_with_logs(farm: dict[str, Any], repo: Path,
                                            cleanup_images: list[str]) -> None:
    with BuildClient(farm["url"]) as client:
        job = client.submit({"repo_dir": str(repo),
                             "profile": _profile(repo, "for i in 1 2 3 4 5 6; do echo tick $i; "
                                                       "sleep 0.5; done")})
        seen: list[str] = []
        steps: set[tuple[int | None, int | None]] = set()
        while True:
            st = job.status()
            if not seen or seen[-1] != st.state.value:
                seen.append(st.state.value)
            if st.state is JobState.BUILDING:
                steps.add((st.step, st.steps))
            if st.ready:
                break
            time.sleep(0.05)
        answer = job.result(timeout=5)
        cleanup_images.append(answer.image_tag)
        lines = list(job.logs())  # a late reader still gets every line
    assert seen == sorted(seen, key=ORDER.index), seen
    assert {"building", "success"} <= set(seen)
    assert "saving_tarball" not in seen  # the answer never waits for its tarball
    assert any(step and total and 0 < step <= total for step, total in steps), steps
    assert any("tick 6" in ln for ln in lines)
    assert any(ln.startswith("Step 1/") for ln in lines)


def test_two_profiles_build_in_parallel_on_two_workers(farm: dict[str, Any], repo: Path,
                                                      cleanup_images: list[str]) -> None:
    with BuildClient(farm["url"]) as client:
        jobs = [client.submit({"repo_dir": str(repo), "profile": _profile(repo, "sleep 4")})
                for _ in range(2)]
        overlap = False
        while not all(j.status().ready for j in jobs):
            states = [j.status().state for j in jobs]
            overlap |= all(s is JobState.BUILDING for s in states)
            time.sleep(0.1)
        answers = [j.result(timeout=5) for j in jobs]
    cleanup_images.extend(a.image_tag for a in answers)
    assert len({a.profile_id for a in answers}) == 2
    assert len({a.worker.split(":")[0] for a in answers}) == 2  # one build on each worker
    assert overlap


def test_lock_wait_frees_the_worker_slot(farm: dict[str, Any], repo: Path,
                                        cleanup_images: list[str]) -> None:
    """A forced rebuild of a profile that is building waits for the lock by retrying,
    so its worker (one slot each here) runs another profile's job meanwhile."""
    # long enough that another profile's build and save finish well inside it
    profile = _profile(repo, "sleep 30")
    with BuildClient(farm["url"]) as client:
        first = client.submit({"repo_dir": str(repo), "profile": profile})
        while first.status().state is not JobState.BUILDING:
            time.sleep(0.1)
        forced = client.submit({"repo_dir": str(repo), "profile": profile,
                                "force_rebuild": True})
        assert forced.id != first.id
        waited = False
        while not waited and not forced.status().ready:
            waited = forced.status().state is JobState.WAITING_FOR_LOCK
            time.sleep(0.05)
        assert waited
        other = client.submit({"repo_dir": str(repo), "profile": _profile(repo, "true")})
        quick = other.result(timeout=120)
        assert not first.status().ready  # the other job ran while the profile was locked
        a, b = first.result(timeout=300), forced.result(timeout=300)
    cleanup_images.extend([a.image_tag, quick.image_tag])
    assert b.cache_source == "built" and b.timings.lock_wait > 0
    assert b.manifest.force_rebuild and a.image_tag == b.image_tag


def test_bad_request_comes_back_structured_without_a_build(farm: dict[str, Any],
                                                           repo: Path, docker_engine) -> None:  # type: ignore[no-untyped-def]
    profile = _profile(repo)
    with BuildClient(farm["url"]) as client:
        job = client.submit({"repo_dir": str(repo / "does-not-exist"), "profile": profile})
        with pytest.raises(BadRequest, match="does not exist") as info:
            job.result(timeout=60)
        assert info.value.to_info().type == "bad_request"
        assert job.status().state is JobState.FAILURE
        # refused in the client before anything is queued
        with pytest.raises(BadRequest, match="inject"):
            client.submit({"repo_dir": str(repo),
                           "profile": {**profile, "install_cmds": ["echo\nRUN x"]}})
    from pfbuild.client.profile import parse_profile

    tag = f"patchfoundry/{parse_profile(profile).profile_id}:latest"
    assert docker_engine.inspect(tag) is None


def test_failed_build_reaches_every_waiter_and_the_next_submit_starts_afresh(
        farm: dict[str, Any], repo: Path) -> None:
    request = {"repo_dir": str(repo), "profile": _profile(repo, "pip install -r nope.txt")}
    with BuildClient(farm["url"]) as client:
        jobs = [client.submit(request) for _ in range(3)]
        assert len({j.id for j in jobs}) == 1
        errors = []
        for j in jobs:
            with pytest.raises(PfbuildError) as info:
                j.result(timeout=300)
            errors.append(info.value)
        assert all(e.type == "build_failed" for e in errors)
        failure = errors[0].failure
        assert failure and failure.failure_class.value == "missing_install_mechanism"
        assert errors[0].build_log_path and Path(errors[0].build_log_path).exists()
        fresh = client.submit(request)
        assert fresh.id != jobs[0].id
        with pytest.raises(PfbuildError):
            fresh.result(timeout=300)


def test_worker_killed_mid_build(docker_engine, farm_dir: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                 cleanup_images: list[str]) -> None:
    """SIGKILL the worker that is building: the job is redelivered to the other worker
    and finishes there, and the dead worker's lock frees itself."""
    server = RedisServer(tmp_path)
    env = _env(server.url, tmp_path, hard_limit=120)
    workers = [Worker(f"k{i}", env, tmp_path) for i in (1, 2)]
    try:
        for w in workers:
            w.wait_ready()
        repo = tmp_path / "hello"
        shutil.copytree(Path(__file__).parent.parent.parent / "examples" / "hello", repo)
        with BuildClient(server.url) as client:
            job = client.submit({"repo_dir": str(repo), "profile": _profile(repo, "sleep 15")})
            deadline = time.monotonic() + 120
            while (st := job.status()).state is not JobState.BUILDING:
                assert time.monotonic() < deadline, st
                time.sleep(0.1)
            assert st.worker
            victim = next(w for w in workers if st.worker.startswith(f"{w.name}@"))
            survivor = next(w for w in workers if w is not victim)
            victim.kill()
            killed_at = time.monotonic()
            r = redis.Redis.from_url(server.url)
            while r.exists(Keys.lock(st.profile_id or "")):
                assert time.monotonic() - killed_at < 6 + 3, "the lock did not expire"
                time.sleep(0.2)
            answer = job.result(timeout=400)
            cleanup_images.append(answer.image_tag)
            assert answer.worker.startswith(f"{survivor.name}@")
            assert answer.cache_source == "built"
            assert int(r.get(Keys.starts(job.id)) or 0) == 2
    finally:
        for w in workers:
            w.stop()
        server.stop()


def _cli(*args: str, env: dict[str, str], stdin: str | None = None) -> tuple[int, str]:
    """Run the CLI with exactly ``env`` on top of os.environ less PFBUILD_REDIS_URL."""
    base = {k: v for k, v in os.environ.items() if k != "PFBUILD_REDIS_URL"}
    proc = subprocess.run([sys.executable, "-m", "pfbuild.client.cli", *args], input=stdin,
                          capture_output=True, text=True, env={**base, **env}, timeout=600)
    return proc.returncode, proc.stdout


def test_cli_submit_status_wait_logs(farm: dict[str, Any], repo: Path,
                                     cleanup_images: list[str]) -> None:
    env = {"PFBUILD_REDIS_URL": farm["url"]}
    (repo / "p.json").write_text(json.dumps(_profile(repo)))
    code, out = _cli("submit", "--repo-dir", str(repo), "--profile", str(repo / "p.json"),
                     "--json", env=env)
    assert code == 0, out
    job_id = json.loads(out)["job_id"]
    code, out = _cli("wait", job_id, "--json", env=env)
    assert code == 0, out
    answer = json.loads(out)
    cleanup_images.append(answer["image_tag"])
    assert answer["cache_source"] == "built"
    code, out = _cli("status", job_id, env=env)
    assert code == 0 and json.loads(out)["state"] == "success"
    code, out = _cli("logs", job_id, env=env)
    assert code == 0 and "Successfully tagged" in out


def test_cancel_a_queued_job(farm: dict[str, Any], repo: Path, docker_engine,  # type: ignore[no-untyped-def]
                             cleanup_images: list[str]) -> None:
    from pfbuild.client.errors import JobCancelled
    from pfbuild.client.profile import parse_profile

    with BuildClient(farm["url"]) as client:
        busy = [client.submit({"repo_dir": str(repo), "profile": _profile(repo, "sleep 6")})
                for _ in range(2)]  # one per worker: the next job stays queued
        while not all(b.status().state is JobState.BUILDING for b in busy):
            time.sleep(0.1)
        profile = _profile(repo, "true")
        queued = client.submit({"repo_dir": str(repo), "profile": profile})
        assert queued.status().state is JobState.QUEUED
        queued.cancel()
        with pytest.raises(JobCancelled):
            queued.result(timeout=5)
        cleanup_images.extend(b.result(timeout=300).image_tag for b in busy)
        time.sleep(2)  # the workers are free again and had the chance to take it
        assert queued.status().state is JobState.CANCELLED
        tag = f"patchfoundry/{parse_profile(profile).profile_id}:latest"
        assert docker_engine.inspect(tag) is None
        # the profile is not stuck: a new submit builds it
        fresh = client.submit({"repo_dir": str(repo), "profile": profile})
        assert fresh.id != queued.id
        cleanup_images.append(fresh.result(timeout=300).image_tag)


def test_embedded_default_builds_without_redis(docker_engine, repo: Path,  # type: ignore[no-untyped-def]
                                               cleanup_images: list[str]) -> None:
    """The README's main command: no PFBUILD_REDIS_URL, `pfbuild submit --wait`."""
    (repo / "p.json").write_text(json.dumps(_profile(repo)))
    request = json.dumps({"repo_dir": str(repo), "profile_path": str(repo / "p.json")})
    code, out = _cli("submit", "--wait", "--json", env={}, stdin=request)
    assert code == 0, out
    answer = json.loads(out)
    cleanup_images.append(answer["image_tag"])
    assert answer["cache_source"] == "built" and answer["timings"]["queue_wait"] >= 0
    assert docker_engine.inspect(answer["image_tag"]).id == answer["image_id"]


def test_embedded_wait_timeout_reports_and_exits_promptly(docker_engine, repo: Path) -> None:  # type: ignore[no-untyped-def]
    """A timeout in the embedded default is a JSON timeout error (exit 6), at once, even
    though the build still runs in one of the process's own worker threads."""
    (repo / "p.json").write_text(json.dumps(_profile(repo, "sleep 60")))
    started = time.monotonic()
    code, out = _cli("submit", "--wait", "--json", "--timeout", "2", "--repo-dir", str(repo),
                     "--profile", str(repo / "p.json"), env={})
    assert code == 6, out
    assert json.loads(out)["error"]["type"] == "timeout"
    assert time.monotonic() - started < 30  # not the 60 s the build would take


def _publisher_pids(record: Path) -> list[int]:
    """The detached publishers of ``record`` running now (their command line names it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(record).encode() in cmdline and b"pfbuild.worker.publish" in cmdline:
            pids.append(int(proc.name))
    return pids


def test_embedded_default_answers_before_its_tarball_and_never_loses_it(  # type: ignore[no-untyped-def]
        docker_engine, repo: Path, tmp_path: Path, cleanup_images: list[str]) -> None:
    """`pfbuild submit --wait` with no Redis exits with its answer, the tarball pending;
    a process of its own saves it after the command has gone. Killed mid-save, it
    leaves no tarball; the next command (a hit) finishes the publication, and after
    `docker rmi` a later one loads the tarball: the same image id."""
    import signal

    from pfbuild.worker import layout
    from pfbuild.worker.caches.tarball import find_tarball

    env = {"PFBUILD_TMP_DIR": str(tmp_path / "pf-tmp")}
    (repo / "p.json").write_text(json.dumps(_profile(repo)))
    request = json.dumps({"repo_dir": str(repo), "profile_path": str(repo / "p.json")})
    code, out = _cli("submit", "--wait", "--json", env=env, stdin=request)
    assert code == 0, out
    first = json.loads(out)
    cleanup_images.append(first["image_tag"])
    pub = first["manifest"]["publications"]["tarball"]
    assert first["cache_source"] == "built" and pub["state"] == "pending"
    target, cache = Path(pub["target"]), Path(pub["target"]).parent
    record = tmp_path / "pf-tmp" / "state" / "publications" / Settings().host_id / \
        f"{first['profile_id']}.json"
    pids = _publisher_pids(record)
    assert len(pids) == 1, "no publisher outlived the command"
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(f".{target.name}.") for p in cache.glob(".*")):
        assert time.monotonic() < deadline and not target.exists()
        time.sleep(0.02)
    os.kill(pids[0], signal.SIGKILL)  # mid-save
    time.sleep(0.5)
    assert layout.fenced_tarballs(cache, first["profile_id"]) == []  # none, torn or whole
    code, out = _cli("submit", "--wait", "--json", env=env, stdin=request)
    hit = json.loads(out)
    assert code == 0 and hit["cache_source"] == "local"
    assert hit["manifest"]["publications"]["tarball"]["state"] == "pending"
    deadline = time.monotonic() + 600  # a niced save of the whole image, on a loaded machine
    while (found := find_tarball(cache, first["profile_id"])) is None or \
            not found.with_name(found.name + ".sha256").exists():
        assert time.monotonic() < deadline, "the publication left pending was not finished"
        time.sleep(0.2)
    landed = json.loads(record.read_text())["publications"]["tarball"]
    assert landed["state"] == "done" and landed["target"] == str(found)
    drop_image(docker_engine, first["image_tag"])
    code, out = _cli("submit", "--wait", "--json", env=env, stdin=request)
    again = json.loads(out)
    assert code == 0 and again["cache_source"] == "tarball"
    assert again["image_id"] == first["image_id"]


def test_a_repeated_farm_hit_is_one_redis_call(farm: dict[str, Any], repo: Path,  # type: ignore[no-untyped-def]
                                               docker_engine, cleanup_images: list[str]) -> None:
    """`pfbuild submit --wait` against a farm, the checkout's hit remembered: answered
    before the command line loads (no typer, no redis-py, no Celery), by one call to Redis,
    only while the host that answered holds the image; once the image is removed from the
    engine, the whole way (a worker answers)."""
    from pfbuild.client.fingerprint import RACY_SECONDS
    from tests.client.test_startup import loaded
    from tests.fakes import drop_image
    from tests.hostsupport import index_holds

    (repo / "p.json").write_text(json.dumps(_profile(repo)))
    request = json.dumps({"repo_dir": str(repo), "profile_path": str(repo / "p.json")})
    env = {"PFBUILD_REDIS_URL": farm["url"], "PFBUILD_TMP_DIR": str(farm["dir"] / "pf-tmp")}

    def submit() -> tuple[dict[str, Any], list[str]]:
        code, out, heavy = loaded("submit", "--wait", "--json", env=env, stdin=request)
        assert code == 0, out
        return json.loads(out), heavy

    built, _ = submit()
    cleanup_images.append(built["image_tag"])
    time.sleep(RACY_SECONDS + 0.1)
    hit, heavy = submit()  # through a worker
    assert hit["cache_source"] == "local" and "celery" in heavy
    # a hit is remembered once the tree is past its racy seconds and the image's
    # publications have landed (a pending one would be repeated as pending)
    deadline = time.monotonic() + 600
    while True:
        quick, heavy = submit()
        if "typer" not in heavy:
            break
        assert quick["cache_source"] == "local" and time.monotonic() < deadline
        hit = quick
        time.sleep(1)
    assert not {m.split(".")[0] for m in heavy} & {"typer", "redis", "celery", "kombu"}
    assert quick["image_id"] == built["image_id"] and quick["cache_source"] == "local"
    assert quick["docker_host"] == hit["docker_host"] and quick["worker"].endswith(":client")

    drop_image(docker_engine, built["image_tag"])
    # the host's codes follow its engine's events within milliseconds
    index_holds(farm["url"], f"{built['profile_id']}:{built['image_tag'].rpartition(':')[2]}",
                None)
    back, heavy = submit()
    assert "celery" in heavy and back["cache_source"] in ("tarball", "built")
    assert docker_engine.inspect(back["image_tag"]).id == back["image_id"]
