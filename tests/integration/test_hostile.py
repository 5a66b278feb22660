"""Hostile input, by class: every refusal clean, nothing read without bound, no poisoning.

Refusals are checked through all three doors that validate (``pfbuild build``, the
worker's task, the client library): exit 2 (or a BadRequest), one JSON error, no
traceback, within seconds, nothing built and nothing written.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from pfbuild.client.errors import BadRequest, BuildFailed, ExitCode, PfbuildError
from pfbuild.client.models import BuildRequest, ErrorInfo
from pfbuild.client.settings import Settings
from pfbuild.worker.engine import BuildSpec
from tests.fakes import FakeEngine, dockerfile_context, drop_image, image_tar

PROFILE: dict[str, Any] = {"install_cmds": ["pip install ."], "env": {"A": "1"}}
BIG = 10 * 1024 * 1024


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    (r / "setup.py").write_text("")
    (r / "repo_profile.json").write_text(json.dumps(PROFILE))
    return r


def _deep(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


def _loop(tmp_path: Path) -> str:
    a, b = tmp_path / "loop-a", tmp_path / "loop-b"
    a.symlink_to(b)
    b.symlink_to(a)
    return str(a / "x")


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo.json"
    os.mkfifo(path)
    return str(path)


def _profile_file(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "hostile_profile.json"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


def _with_profile(repo: Path, profile: Any) -> bytes:
    return json.dumps({"repo_dir": str(repo), "profile": profile}).encode()


# --- stdin requests: (name, function of (repo, tmp_path) -> the bytes on stdin) ----------
STDIN_CASES: list[tuple[str, Any]] = [
    # 1. crashes instead of refusals
    ("lone surrogate", lambda r, t: b'{"repo_dir": "\\ud800", "profile": {}}'),
    ("raw 0xFF in a string", lambda r, t: b'{"repo_dir": "\xff", "profile": {}}'),
    ("deep nesting", lambda r, t: b'{"repo_dir": ".", "profile": ' + b'{"a":' * 100_000),
    ("deep nesting, closed", lambda r, t: b'{"repo_dir": ".", "profile": ' + b"[" * 50
     + b"]" * 50 + b"}"),
    ("5000-digit number", lambda r, t: b'{"repo_dir": ".", "profile": {"x": 1' + b"0" * 5000
     + b"}}"),
    ("NUL in repo_dir", lambda r, t: b'{"repo_dir": "/tmp/a\\u0000b", "profile": {}}'),
    ("huge repo_dir", lambda r, t: json.dumps({"repo_dir": "/a" * 100_000,
                                               "profile": PROFILE}).encode()),
    ("long path component", lambda r, t: json.dumps({"repo_dir": "/" + "a" * 4000,
                                                     "profile": PROFILE}).encode()),
    ("repo_dir loop", lambda r, t: json.dumps({"repo_dir": _loop(t), "profile": PROFILE}).encode()),
    ("profile_path loop", lambda r, t: json.dumps({"repo_dir": str(r),
                                                   "profile_path": _loop(t)}).encode()),
    ("image_cache_dir loop", lambda r, t: json.dumps({"repo_dir": str(r), "profile": PROFILE,
                                                      "image_cache_dir": _loop(t)}).encode()),
    ("image_cache_dir NUL", lambda r, t: json.dumps({"repo_dir": str(r), "profile": PROFILE,
                                                     "image_cache_dir": "/tmp/\x00"}).encode()),
    # 2. reads without bound, and hangs
    ("profile_path /dev/zero", lambda r, t: json.dumps({"repo_dir": str(r),
                                                        "profile_path": "/dev/zero"}).encode()),
    ("profile_path /dev/urandom", lambda r, t: json.dumps(
        {"repo_dir": str(r), "profile_path": "/dev/urandom"}).encode()),
    ("profile_path FIFO", lambda r, t: json.dumps({"repo_dir": str(r),
                                                   "profile_path": _fifo(t)}).encode()),
    ("profile_path too big", lambda r, t: json.dumps({"repo_dir": str(r), "profile_path":
                                                      _profile_file(t, " " * (2 << 20))}).encode()),
    ("profile file nested", lambda r, t: json.dumps({"repo_dir": str(r), "profile_path":
                                                     _profile_file(t, "[" * 100_000)}).encode()),
    ("profile file 0xFF", lambda r, t: json.dumps({"repo_dir": str(r), "profile_path":
                                                   _profile_file(t, b'{"x": "\xff"}')}).encode()),
    ("200,000-digit version", lambda r, t: _with_profile(
        r, {**PROFILE, "python_version_target": "1" * 200_000})),
    ("100,000 env entries", lambda r, t: _with_profile(
        r, {**PROFILE, "env": {f"K{i}": "v" for i in range(100_000)}})),
    ("request over 1 MiB", lambda r, t: _with_profile(r, {**PROFILE, "pad": "x" * (2 << 20)})),
    # 5. sent to the engine instead of refused
    ("10 MB install command", lambda r, t: _with_profile(r, {"install_cmds": ["x" * BIG]})),
    ("10 MB env value", lambda r, t: _with_profile(r, {**PROFILE, "env": {"A": "x" * BIG}})),
    ("100,000-char env key", lambda r, t: _with_profile(r, {**PROFILE,
                                                            "env": {"A" * 100_000: "1"}})),
    ("--network=host", lambda r, t: _with_profile(r, {"install_cmds": ["--network=host pip x"]})),
    ("--mount=", lambda r, t: _with_profile(r, {"install_cmds": ["  --mount=type=bind,src=/,"
                                                                 "dst=/h cat /h/etc/shadow"]})),
    # 6. accepted, should be refused
    ("NaN", lambda r, t: b'{"repo_dir": ".", "profile": {"x": NaN}}'),
    ("Infinity", lambda r, t: b'{"repo_dir": ".", "profile": {"x": -Infinity}}'),
    ("1e999", lambda r, t: b'{"repo_dir": ".", "profile": {"x": 1e999}}'),
    ("duplicate request key", lambda r, t: ('{"repo_dir": "%s", "repo_dir": "/", "profile": %s}'
                                            % (r, json.dumps(PROFILE))).encode()),
    ("duplicate env key", lambda r, t: ('{"repo_dir": "%s", "profile": {"install_cmds": ["x"], '
                                        '"env": {"A": "1", "A": "2"}}}' % r).encode()),
    ("duplicate key in profile file", lambda r, t: json.dumps({"repo_dir": str(r), "profile_path":
        _profile_file(t, '{"install_cmds": ["a"], "install_cmds": ["b"]}')}).encode()),
]


def _build_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stdin: bytes
) -> tuple[int, Any, str, FakeEngine]:
    """`pfbuild build` in this process, against a fake engine that records any build."""
    from pfbuild.client.cli import main

    engine = FakeEngine()
    monkeypatch.setattr("pfbuild.worker.engine.DockerEngine", lambda *a, **k: engine)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = main(["build"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err, engine


def _assert_refused(error: dict[str, Any]) -> PfbuildError:
    again = PfbuildError.from_info(ErrorInfo.model_validate(error))
    assert isinstance(again, BadRequest), error
    return again


@pytest.mark.parametrize(("name", "make"), STDIN_CASES, ids=[c[0] for c in STDIN_CASES])
def test_pfbuild_build_refuses_cleanly(
    name: str, make: Any, repo: Path, tmp_path: Path, settings: Settings,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PFBUILD_TMP_DIR", str(settings.tmp_dir))
    stdin = make(repo, tmp_path)
    started = time.monotonic()
    code, out, err, engine = _build_in_process(monkeypatch, capsys, stdin)
    seconds = time.monotonic() - started
    assert code == ExitCode.BAD_REQUEST, out
    assert set(out) == {"error"} and "Traceback" not in err
    _assert_refused(out["error"])
    assert seconds < 10, f"{name}: refused after {seconds:.1f}s"
    assert engine.builds == [] and engine.loads == 0 and engine.images == {}
    assert not (repo / ".pf_manifest").exists()
    assert not (settings.tmp_dir / "image-cache").exists()  # type: ignore[operator]


@pytest.mark.parametrize(
    "stdin",
    [b'{"repo_dir": "\xff", "profile": {}}', b'{"repo_dir": "\\udfff", "profile": {}}',
     b"[" * 200_000, b'{"repo_dir": ".", "profile": {"x": NaN}}'],
    ids=["0xFF", "surrogate", "nested", "NaN"],
)
def test_pfbuild_build_subprocess_refuses_without_traceback(stdin: bytes) -> None:
    """The real command line, stdin as raw bytes, whatever the locale."""
    proc = subprocess.run(
        [sys.executable, "-m", "pfbuild.client.cli", "build"],
        input=stdin, capture_output=True, timeout=60,
        env={**os.environ, "LC_ALL": "C", "PYTHONIOENCODING": ""},
    )
    assert proc.returncode == ExitCode.BAD_REQUEST, proc.stdout
    assert b"Traceback" not in proc.stderr
    _assert_refused(json.loads(proc.stdout)["error"])


# --- the worker's task and the client: the same refusals from a dict --------------------
def _dict_cases(repo: Path, tmp_path: Path) -> list[dict[str, Any]]:
    base: dict[str, Any] = {"repo_dir": str(repo)}
    return [
        {**base, "profile": {**PROFILE, "env": {"A": "\ud800"}}},
        {**base, "profile": {**PROFILE, "x": float("nan")}},
        {**base, "profile": {**PROFILE, "x": float("inf")}},
        {**base, "profile": {**PROFILE, "x": 10**5000}},
        {**base, "profile": {**PROFILE, "x": _deep(10_000)}},
        {"repo_dir": str(repo) + "\x00", "profile": PROFILE},
        {"repo_dir": "/" + "a/" * 50_000, "profile": PROFILE},
        {**base, "profile": {**PROFILE, "env": {f"K{i}": "v" for i in range(100_000)}}},
        {**base, "profile": {"install_cmds": ["x" * BIG]}},
        {**base, "profile": {"install_cmds": ["--network=host true"]}},
        {**base, "profile": {**PROFILE, "python_version_target": "9" * 200_000}},
        {**base, "profile_path": _fifo(tmp_path)},
        {**base, "profile_path": "/dev/zero"},
    ]


def _worker_only_cases(repo: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """Paths only a worker resolves (they mean the worker's file system, not the client's)."""
    base: dict[str, Any] = {"repo_dir": str(repo), "profile": PROFILE}
    return [
        {**base, "image_cache_dir": _loop(tmp_path)},
        {"repo_dir": _loop(tmp_path / "repo"), "profile": PROFILE},
        {**base, "image_cache_dir": "/" + "b" * 300},
    ]


def test_the_worker_task_refuses_the_same(url: str, repo: Path, tmp_path: Path) -> None:
    from pfbuild.client.profile import parse_profile
    from tests.fakes import eager_worker

    settings = Settings(redis_url=url, tmp_dir=tmp_path / "t", host_id="h")
    engine = FakeEngine()
    _, task = eager_worker(settings, url, engine)
    pid = parse_profile(PROFILE).profile_id
    cases = _dict_cases(repo, tmp_path) + _worker_only_cases(repo, tmp_path)
    for i, request in enumerate(cases):
        started = time.monotonic()
        result = task.apply(kwargs={"request": request, "profile_id": pid, "submitted_at": 0.0},
                            task_id=f"hostile-{i}")
        assert result.state == "FAILURE", i
        assert isinstance(result.result, BadRequest), (i, result.result)
        assert time.monotonic() - started < 10, i
    assert engine.builds == [] and not (repo / ".pf_manifest").exists()


def test_the_client_refuses_the_same_before_queueing(
    url: str, repo: Path, tmp_path: Path
) -> None:
    import redis

    from pfbuild.client.jobs import BuildClient

    with BuildClient(url, Settings(redis_url=url)) as client:
        for i, request in enumerate(_dict_cases(repo, tmp_path)):
            started = time.monotonic()
            with pytest.raises(BadRequest):
                client.submit(request)
            assert time.monotonic() - started < 10, i
    assert redis.Redis.from_url(url).keys("*") == []  # nothing was queued


# --- 3. information leak through unsupported_registry.json -------------------------------
def test_a_registry_symlink_is_not_read_through(repo: Path, tmp_path: Path,
                                                settings: Settings) -> None:
    from tests.fakes import run_request

    secret = tmp_path / "docker-config.json"
    secret.write_text(json.dumps({"auths": {"registry": {"auth": "c2VjcmV0"}}}))
    (repo / ".pf_manifest").mkdir()
    registry = repo / ".pf_manifest" / "unsupported_registry.json"
    registry.symlink_to(secret)
    engine = FakeEngine()
    engine.build_ok = lambda dockerfile: False
    engine.build_log = lambda dockerfile: ["ERROR: Invalid requirement: 'x=='"]
    request = BuildRequest.model_validate({"repo_dir": str(repo), "profile": PROFILE})
    with pytest.raises(BuildFailed):
        run_request(request, settings, engine)
    assert not registry.is_symlink()
    assert "c2VjcmV0" not in registry.read_text() and "auths" not in registry.read_text()
    assert json.loads(secret.read_text()) == {"auths": {"registry": {"auth": "c2VjcmV0"}}}


@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_a_registry_that_is_a_fifo_or_device_does_not_hang(
    repo: Path, settings: Settings, kind: str
) -> None:
    from pfbuild.worker.build.failures import record_unsupported

    (repo / ".pf_manifest").mkdir()
    registry = repo / ".pf_manifest" / "unsupported_registry.json"
    if kind == "fifo":
        os.mkfifo(registry)
    else:
        registry.symlink_to("/dev/zero")
    from pfbuild.client.models import Actionability, FailureClass, FailureInfo

    failure = FailureInfo(failure_class=FailureClass.BUILD_FAILURE,
                          actionability=Actionability.INFRA_ISSUE, remediation="r",
                          retry_on_policy_change=False)
    started = time.monotonic()
    entry = record_unsupported(registry, "p1", failure, variant="standard")
    assert entry["count"] == 1 and time.monotonic() - started < 5
    assert registry.is_file() and not registry.is_symlink()


# --- 4. cache poisoning and destruction ---------------------------------------------------
def _evil_tar(members: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(
    "planted",
    ["gzip-victim", "zstd-no-sidecar", "zstd-matching-sidecar", "dotdot", "absolute", "symlink"],
)
def test_a_planted_tarball_never_reaches_the_engine(
    repo: Path, settings: Settings, planted: str
) -> None:
    import hashlib

    import zstandard

    from pfbuild.client.profile import parse_profile
    from pfbuild.worker.engine import ImageInfo
    from tests.fakes import run_request

    pid = parse_profile(PROFILE).profile_id
    cache_dir = settings.tmp_dir / "image-cache"  # type: ignore[operator]
    cache_dir.mkdir(parents=True)
    victim = image_tar("python:3.11-slim", b"planted")
    if planted == "gzip-victim":
        path, data = cache_dir / f"{pid}.tar", gzip.compress(victim)
    elif planted.startswith("zstd"):
        path, data = cache_dir / f"{pid}.tar.zst", zstandard.ZstdCompressor().compress(victim)
        if planted == "zstd-matching-sidecar":
            digest = hashlib.sha256(data).hexdigest()
            (cache_dir / f"{pid}.tar.zst.sha256").write_text(f"{digest}  {path.name}\n")
    else:
        name = {"dotdot": "../../escape", "absolute": "/tmp/pfbuild-escape"}.get(planted, "link")
        data = _evil_tar([("repositories", b"patchfoundry/" + pid.encode() + b":latest"),
                          (name, None if planted == "symlink" else b"x")])
        path = cache_dir / f"{pid}.tar"
    path.write_bytes(data)
    engine = FakeEngine()
    engine.images["python:3.11-slim"] = original = ImageInfo(id="sha256:" + "1" * 64, labels={})
    request = BuildRequest.model_validate({"repo_dir": str(repo), "profile": PROFILE})
    answer = run_request(request, settings, engine)
    assert engine.loads == 0, "the planted tarball reached the engine"
    assert engine.images["python:3.11-slim"] is original
    assert answer.cache_source == "built"
    assert not path.exists() or path.read_bytes() != data  # ours may have replaced it
    assert [q.read_bytes() for q in (cache_dir / "quarantine").iterdir()
            if not q.name.endswith(".sha256")] == [data]
    assert any("did not save" in e for e in answer.manifest.events)
    # and what pfbuild saved in its place is trusted next time
    drop_image(engine, answer.image_tag)
    again = run_request(request, settings, engine)
    assert again.cache_source == "tarball" and engine.loads == 1


# --- regexes over request and log text run in linear time ---------------------------------
@pytest.mark.parametrize(
    "text",
    ["Failed to fetch " * 65_536, "No such file or directory: 'requirements" * 26_000,
     "fatal error: " * 80_000, "No matching distribution " * 40_000,
     "apt-get update" * 75_000, "Release file for " * 60_000, "pywin32 " * 130_000,
     "Failed to fetch x\n" * 58_000],
    ids=["fetch", "quoted", "fatal", "pywin-dist", "apt", "release", "pywin", "lines"],
)
def test_log_patterns_take_linear_time_on_a_megabyte(text: str) -> None:
    from pfbuild.worker.build.failures import classify, read_symptoms

    started = time.perf_counter()
    classify(text)
    read_symptoms(text)
    seconds = time.perf_counter() - started
    print(f"{len(text) / 1e6:.2f} MB of {text[:20]!r}...: {seconds:.3f}s")
    assert seconds < 5  # quadratic took 22 s on 128 kB


def test_python_version_takes_linear_time_on_a_megabyte() -> None:
    from pfbuild.client.profile import python_version

    for text in ("1" * (1 << 20), "1." * (1 << 19), "a1" * (1 << 19)):
        started = time.perf_counter()
        python_version(text)
        seconds = time.perf_counter() - started
        print(f"python_version on 1 MB of {text[:4]!r}: {seconds:.3f}s")
        assert seconds < 5


def test_a_log_line_without_end_is_cut_as_it_arrives() -> None:
    """The real engine's line splitter: 4 MB without a newline, in pieces, quickly."""
    pytest.importorskip("docker")
    from pfbuild.worker.engine import MAX_LOG_LINE, DockerEngine

    class API:
        def build(self, **kwargs: Any) -> Any:
            for _ in range(4096):
                yield {"stream": "x" * 1024}
            yield {"error": "failed"}

    engine = DockerEngine.__new__(DockerEngine)
    engine.host, engine.api = "fake", API()
    lines: list[str] = []
    started = time.perf_counter()
    outcome = engine.build(io.BytesIO(), BuildSpec(tag="t", dockerfile="D"), lines.append)
    assert not outcome.ok and time.perf_counter() - started < 5
    assert max(len(line) for line in lines) <= MAX_LOG_LINE
    assert sum(len(line) for line in lines if line.startswith("x")) == 4096 * 1024


# --- bounded reads ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "devzero", "urandom", "loop", "dir", "big"])
def test_read_bounded_refuses_what_is_not_a_small_regular_file(tmp_path: Path,
                                                               kind: str) -> None:
    from pfbuild.client.inputs import read_bounded

    path = {"fifo": lambda: _fifo(tmp_path), "devzero": lambda: "/dev/zero",
            "urandom": lambda: "/dev/urandom", "loop": lambda: _loop(tmp_path),
            "dir": lambda: str(tmp_path),
            "big": lambda: _profile_file(tmp_path, b"x" * 2000)}[kind]()
    started = time.monotonic()
    with pytest.raises(BadRequest):
        read_bounded(path, what="file", limit=1000)
    assert time.monotonic() - started < 5


def test_a_dockerignore_that_is_a_fifo_is_refused(repo: Path) -> None:
    from pfbuild.worker.build.context import scan_context

    os.mkfifo(repo / ".dockerignore")
    with pytest.raises(BadRequest, match="dockerignore"):
        scan_context(repo)


# --- idle timeout ----------------------------------------------------------------------
def test_the_idle_timeout_reaches_the_engine(repo: Path, tmp_path: Path) -> None:
    from tests.fakes import run_request

    settings = Settings(tmp_dir=tmp_path / "t", host_id="h", idle_timeout=42)
    engine = FakeEngine()
    run_request(BuildRequest.model_validate({"repo_dir": str(repo), "profile": PROFILE}),
              settings, engine)
    assert engine.builds[0]["idle_timeout"] == 42


@pytest.mark.docker
def test_a_silent_build_is_stopped_after_the_idle_timeout(docker_engine) -> None:  # type: ignore[no-untyped-def]
    import uuid

    from pfbuild.client.errors import BuildIdleTimeout

    tag = f"pftest/idle-{uuid.uuid4().hex[:10]}:latest"
    marker = uuid.uuid4().hex
    dockerfile = f"FROM python:3.11-slim\nRUN echo {marker} && sleep 120\n"
    buf = dockerfile_context(dockerfile)
    lines: list[str] = []
    started = time.monotonic()
    try:
        with pytest.raises(BuildIdleTimeout, match="printed nothing for 3s"):
            spec = BuildSpec(tag=tag, dockerfile="Dockerfile", nocache=True, idle_timeout=3)
            docker_engine.build(buf, spec, lines.append)
        assert time.monotonic() - started < 60
        assert marker in lines
        # the engine stops the build when the connection closes: its step's container goes
        # well before its `sleep 120` would end (a loaded engine takes some seconds)
        deadline = time.monotonic() + 60
        while True:
            ps = subprocess.run(["docker", "ps", "-q", "--filter", "ancestor=python:3.11-slim"],
                                capture_output=True, text=True)
            running = [cid for cid in ps.stdout.split()
                       if marker in subprocess.run(["docker", "inspect", cid],
                                                   capture_output=True, text=True).stdout]
            if not running or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert running == []
    finally:
        docker_engine.remove(tag)
