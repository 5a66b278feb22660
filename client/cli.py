"""The ``pfbuild`` command line: parsing here, doing elsewhere.

The client's commands (``submit``, ``status``, ``wait``, ``logs``, ``cancel``, ``hosts``,
``top``) live here. The worker's (``build``, ``base-image``, ``worker``, ``bench``, ``gc``)
live in the worker package and join this one command through the ``pfbuild.cli`` entry
point when the worker's extras are installed, so this package never imports the worker.

Start-up is paid for what a command uses (docs/design.md, "Start-up"): a client command
loads no entry point (so nothing of the worker, the docker SDK or requests), and each
command imports the queue, the client library or ``rich`` only when it runs. The embedded
default loads the worker's part only when it is needed, and answers a hit through it
without starting a broker (:func:`_submit_embedded`).

Every command prints JSON on stdout for machines (the answer, or ``{"error": {...}}``)
and readable progress on stderr when it is a terminal. Exit codes are named in
:class:`~pfbuild.client.errors.ExitCode`; a usage error is exit 2 with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pfbuild.client.console import emit, fail, settings_of
from pfbuild.client.errors import BadRequest, ExitCode, JobTimeout, NoWorkers, PfbuildError
from pfbuild.client.settings import Settings

if TYPE_CHECKING:
    from pfbuild.client.jobs import BuildJob
    from pfbuild.client.models import BuildAnswer, BuildRequest

__all__ = [
    "CLIENT_COMMANDS",
    "Extensions",
    "app",
    "hit_fingerprint",
    "main",
    "parse_request",
    "read_stdin",
    "remember_hit",
]

app = typer.Typer(
    name="pfbuild",
    help="Build farm for deterministic Docker images of repositories.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@dataclass
class Extensions:
    """What the worker package lends the client's commands when it is installed."""

    # ``embedded_run(settings, request, show)``: run the pipeline here for a request no
    # hit answered (``show``: progress on the terminal); its answer
    embedded_run: Callable[[Settings, BuildRequest, bool], BuildAnswer] | None = None
    # ``embedded_hit(settings, request)``: the answer when the local engine already holds
    # this very code (the pipeline's own hit check), else None: something must be built
    embedded_hit: Callable[[Settings, BuildRequest], BuildAnswer | None] | None = None
    # ``engine_hit_check(settings, answer)``: how a quick hit tells that the local engine
    # still holds ``answer``'s image (``client/quickhit.py``); None: not to be remembered
    engine_hit_check: Callable[[Settings, BuildAnswer], dict[str, Any] | None] | None = None
    loaded: bool = False  # whether the entry points were loaded into this one


EXTENSIONS = Extensions()

# The commands defined here: running one loads no entry point (no worker, no docker SDK).
CLIENT_COMMANDS = frozenset({"submit", "status", "wait", "logs", "cancel", "hosts", "top"})


@app.callback()
def _settings(ctx: typer.Context) -> None:
    """Build farm for deterministic Docker images of repositories."""
    ctx.obj = Settings()  # read once per command, passed down


def parse_request(text: str | bytes, settings: Settings | None = None) -> BuildRequest:
    """A request from strict JSON; every problem is a BadRequest naming the field."""
    from pfbuild.client.inputs import JsonLimits, loads_strict
    from pfbuild.client.profile import validate_request

    settings = settings or Settings()
    data = loads_strict(text, what="the request", limits=JsonLimits.of(settings))
    return validate_request(data, settings)


def read_stdin(settings: Settings) -> bytes:
    """stdin as bytes (decoded strictly later), one byte past the limit at most; with what
    the quick hit check read of it first (``client/quickhit.py``)."""
    from pfbuild.client.quickhit import take_stdin

    limit = settings.max_request_bytes + 1
    read = take_stdin() or b""
    if len(read) >= limit:
        return read[:limit]
    return read + sys.stdin.buffer.read(limit - len(read))


def remember_hit(
    command: str, raw: bytes | None, fingerprint: str | None, answer: BuildAnswer,
    check: Callable[[], dict[str, Any] | None],
) -> None:
    """Remember a hit for the next identical command (``client/quickhit.py``); ``check()``
    says how to tell its image is still held (None: not to be remembered). Best effort:
    a hit is answered whether or not it could be remembered."""
    if raw is None or fingerprint is None or answer.cache_source != "local":
        return
    from pfbuild.client.quickhit import remember

    try:
        how = check()
        if how is not None:
            remember(command, raw, fingerprint, answer.model_dump(mode="json"), how)
    except Exception:  # the answer stands; the next call goes the whole way
        return


def farm_hit_check(answer: BuildAnswer) -> dict[str, Any]:
    """How a quick hit tells that the farm host that answered still holds the image."""
    from pfbuild.client.hosts import HostKeys, held_code
    from pfbuild.client.queue import Keys

    host = answer.docker_host
    return {
        "keys": [Keys.stats(), HostKeys.heartbeat(host), HostKeys.codes(host), Keys.uses(host)],
        "member": held_code(answer.profile_id, answer.image_tag.rpartition(":")[2]),
        "host": host,
    }


def _read_request(
    repo_dir: str | None,
    profile: str | None,
    force: bool,
    cache_dir: str | None,
    settings: Settings,
) -> tuple[BuildRequest, bytes | None]:
    """The request, and its bytes when it came on stdin."""
    from pfbuild.client.profile import validate_request

    if repo_dir is None:
        if sys.stdin.isatty():
            raise BadRequest("give --repo-dir and --profile, or a request object on stdin")
        raw = read_stdin(settings)
        return parse_request(raw, settings), raw
    if profile is None:
        raise BadRequest("--profile is required with --repo-dir")
    data: dict[str, Any] = {"repo_dir": repo_dir, "profile_path": profile, "force_rebuild": force}
    if cache_dir:
        data["image_cache_dir"] = cache_dir
    return validate_request(data, settings), None


def hit_fingerprint(settings: Settings, raw: bytes | None) -> str | None:
    """The checkout's stat fingerprint, before its hit check, when a hit of this request
    may be remembered (``client/quickhit.py``)."""
    if raw is None or not settings.client_hits:
        return None
    from pfbuild.client.quickhit import checkout_fingerprint

    try:
        return checkout_fingerprint(raw)
    except OSError:  # the working directory is gone: nothing to remember
        return None


def _watch(job: BuildJob, timeout: float | None, show: bool) -> BuildAnswer:
    """Wait for ``job``, showing stage and build step on a terminal as they change.

    Bounded like ``result()``: ``timeout`` defaults to ``Settings.wait_timeout``, and a job
    that no longer exists raises JobLost."""
    if not show:
        return job.result(timeout)
    from rich.console import Console

    limit = job.client.settings.wait_timeout if timeout is None else timeout
    deadline = time.monotonic() + limit
    with Console(stderr=True).status(f"job {job.id}: queued") as spinner:
        while True:
            answer = job.poll()
            if answer is not None:
                return answer
            st = job.status()
            step = f" step {st.step}/{st.steps}" if st.step else ""
            line = (st.line or "").strip()[:90]
            spinner.update(f"job {job.id}: [bold]{st.stage}[/bold]{step} {line}")
            if time.monotonic() > deadline:
                return job.result(timeout=0)
            time.sleep(0.3)


def _report_idle_queue(job: BuildJob, keep_waiting: bool) -> None:
    """If ``job`` still sits queued on a Redis that no worker consumes, say so on stderr
    (one JSON object) and raise NoWorkers, unless ``keep_waiting``."""
    from pfbuild.client.models import JobState

    client = job.client
    if job.status().state is not JobState.QUEUED or client.workers_alive():
        return
    from kombu.utils.url import maybe_sanitize_url  # no password in the message

    url = str(maybe_sanitize_url(client.url))
    then = "waiting for one (--wait-for-workers)" if keep_waiting else "giving up waiting"
    err = NoWorkers(
        f"job {job.id} is queued on {url}, which no worker consumes; {then}. Start workers "
        "on that Redis, or point PFBUILD_REDIS_URL at the farm's (the compose farm's is "
        f"redis://127.0.0.1:6380/0). The job stays queued: `pfbuild wait {job.id}`.",
        details={"job_id": job.id, "profile_id": job.profile_id, "redis_url": url,
                 "waiting": keep_waiting},
    )
    warning = err.to_info().model_dump(mode="json", exclude_none=True)
    sys.stderr.write(json.dumps({"warning": warning}) + "\n")
    sys.stderr.flush()
    if not keep_waiting:
        raise err


def _await(job: BuildJob, timeout: float | None, show: bool, keep_waiting: bool) -> BuildAnswer:
    """:func:`_watch`, asking once, after ``no_worker_grace`` seconds without an answer,
    whether any worker consumes the queue (an answer within the grace costs nothing more)."""
    settings = job.client.settings
    limit = settings.wait_timeout if timeout is None else timeout
    grace = settings.no_worker_grace
    if grace <= 0 or limit <= grace:
        return _watch(job, limit, show)
    started = time.monotonic()
    try:
        return _watch(job, grace, show)
    except JobTimeout:
        pass
    _report_idle_queue(job, keep_waiting)
    return _watch(job, max(0.0, limit - (time.monotonic() - started)), show)


def _submit_embedded(
    settings: Settings, request: BuildRequest, timeout: float | None, show: bool,
    raw: bytes | None = None,
) -> BuildAnswer:
    """No PFBUILD_REDIS_URL: answer a hit on the local engine at once, else run the
    pipeline in this process (``worker/embedded.py``).

    The hit is the pipeline's own hit check (profile, context digest, the image's labels),
    which takes no lock, as in the farm; anything else (a miss, a forced rebuild) runs
    under the profile's file lock on this host, as ``pfbuild build`` does, and is answered
    once its image is on the engine (a process of its own publishes it)."""
    _load_extensions()
    if EXTENSIONS.embedded_hit is None or EXTENSIONS.embedded_run is None:
        raise BadRequest(
            "PFBUILD_REDIS_URL is not set and the worker is not installed here: point "
            "PFBUILD_REDIS_URL at the farm's Redis, or pip install 'pfbuild[worker]'"
        )
    fingerprint = hit_fingerprint(settings, raw)
    answer = EXTENSIONS.embedded_hit(settings, request)
    if answer is not None:
        check = EXTENSIONS.engine_hit_check
        if check is not None:
            hit = answer
            remember_hit("submit", raw, fingerprint, hit, lambda: check(settings, hit))
        return answer
    run = EXTENSIONS.embedded_run
    limit = settings.wait_timeout if timeout is None else timeout
    try:
        return _bounded(lambda: run(settings, request, show), limit)
    except (JobTimeout, KeyboardInterrupt) as exc:
        # The build goes on in a thread of this very process, which nothing can
        # interrupt: report now and leave at once (the engine stops the build when its
        # connection closes with the process).
        code = fail(exc).exit_code if isinstance(exc, JobTimeout) else 130
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _bounded(work: Callable[[], BuildAnswer], limit: float) -> BuildAnswer:
    """``work()`` in a thread of its own, waited for at most ``limit`` seconds (JobTimeout
    past it); what it raised is raised here."""
    import threading

    done: list[BuildAnswer] = []
    failed: list[BaseException] = []

    def target() -> None:
        try:
            done.append(work())
        except BaseException as exc:  # handed to the waiting thread
            failed.append(exc)

    thread = threading.Thread(target=target, name="pfbuild-embedded", daemon=True)
    thread.start()
    thread.join(min(limit, threading.TIMEOUT_MAX))
    if failed:
        raise failed[0]
    if not done:
        raise JobTimeout(f"no answer after {limit}s: the build was still running")
    return done[0]


@app.command()
def submit(
    ctx: typer.Context,
    repo_dir: Annotated[str | None, typer.Option(help="Repository to build.")] = None,
    profile: Annotated[str | None, typer.Option(help="Path of its repo_profile.json.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if cached.")] = False,
    cache_dir: Annotated[str | None, typer.Option(help="Tarball cache folder.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait and print the answer.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait at most.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine output only.")] = False,
    wait_for_workers: Annotated[
        bool, typer.Option(help="Keep waiting when no worker consumes the Redis (else exit 5).")
    ] = False,
) -> None:
    """Submit a build (a request on stdin, or flags) to the farm; --wait for its answer.

    With no PFBUILD_REDIS_URL, --wait runs an embedded broker and worker in this process.
    A job still queued after a second or two on a Redis that no worker consumes is
    reported on stderr, and --wait ends with NoWorkers (exit 5) unless --wait-for-workers.
    """
    settings = settings_of(ctx)
    show = not as_json and sys.stderr.isatty()
    try:
        request, raw = _read_request(repo_dir, profile, force, cache_dir, settings)
        if settings.redis_url is None:
            if not wait:
                raise BadRequest(
                    "PFBUILD_REDIS_URL is not set: use --wait to build on the "
                    "embedded broker and worker, or point it at the farm's Redis"
                )
            answer = _submit_embedded(settings, request, timeout, show, raw)
        else:
            from pfbuild.client.jobs import BuildClient

            fingerprint = hit_fingerprint(settings, raw) if wait else None
            with BuildClient(settings=settings) as client:
                job = client.submit(request)
                if not wait:
                    emit({"job_id": job.id, "profile_id": job.profile_id, "joined": job.joined})
                    return
                keep = wait_for_workers or settings.wait_for_workers
                answer = _await(job, timeout, show, keep)
            if fingerprint is not None:
                found = answer
                remember_hit("submit", raw, fingerprint, found, lambda: farm_hit_check(found))
    except PfbuildError as exc:
        raise fail(exc) from None
    emit(answer.model_dump(mode="json"))


def _on_job(
    ctx: typer.Context, job_id: str, act: Callable[[BuildJob], dict[str, Any] | None]
) -> None:
    """Run ``act`` on one job of the farm; print what it returns, or the error."""
    from pfbuild.client.jobs import BuildClient

    try:
        with BuildClient(settings=settings_of(ctx)) as client:
            out = act(client.job(job_id))
    except PfbuildError as exc:
        raise fail(exc) from None
    if out is not None:
        emit(out)


@app.command()
def status(ctx: typer.Context, job_id: str) -> None:
    """Print a job's state, stage, build step and last log line."""
    _on_job(ctx, job_id, lambda job: job.status().model_dump(mode="json"))


@app.command("wait")
def wait_cmd(
    ctx: typer.Context,
    job_id: str,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait at most.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine output only.")] = False,
) -> None:
    """Wait for a job and print its answer (or its structured error)."""
    show = not as_json and sys.stderr.isatty()
    _on_job(ctx, job_id, lambda job: _watch(job, timeout, show).model_dump(mode="json"))


@app.command()
def logs(
    ctx: typer.Context,
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
) -> None:
    """Print a job's build log lines (all so far; with -f, then live ones)."""

    def print_lines(job: BuildJob) -> None:
        for line in job.logs(follow=follow):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    _on_job(ctx, job_id, print_lines)


@app.command()
def cancel(ctx: typer.Context, job_id: str) -> None:
    """Cancel a job (terminating its build if it runs)."""

    def cancel_job(job: BuildJob) -> dict[str, Any]:
        job.cancel()
        return {"job_id": job_id, "cancelled": True}

    _on_job(ctx, job_id, cancel_job)


@app.command("top")
def top_cmd(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One snapshot as JSON.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 2.0,
) -> None:
    """The farm at a glance: hosts, queue, running jobs, failures, cache hits, disk."""
    from pfbuild.client.top import top

    top(ctx, as_json, interval)


@app.command()
def hosts(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine output.")] = False,
) -> None:
    """List the farm's hosts: liveness, running jobs and the images each engine holds."""
    import redis

    from pfbuild.client.errors import QueueUnavailable
    from pfbuild.client.hosts import list_hosts
    from pfbuild.client.jobs import BuildClient

    try:
        with BuildClient(settings=settings_of(ctx)) as client:
            try:
                found = list_hosts(client.redis)
            except redis.RedisError as exc:
                raise QueueUnavailable(f"cannot reach Redis: {exc}") from None
    except PfbuildError as exc:
        raise fail(exc) from None
    if as_json or not sys.stdout.isatty():
        emit({"hosts": [h.model_dump(mode="json") for h in found]})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pfbuild hosts")
    columns = ("host", "alive", "engine", "seen (s ago)", "docker host", "running", "images",
               "codes")
    for col in columns:
        table.add_column(col)
    for h in found:
        table.add_row(
            h.host_id,
            "yes" if h.alive else "DEAD",
            {True: "up", False: "DOWN", None: "?"}[h.engine_ok],
            str(h.seconds_since_seen),
            h.docker_host or "",
            f"{len(h.running)}/{h.concurrency}",
            str(len(h.images)),  # profiles, under :latest or a code tag
            str(len(h.codes)),  # code tags: the images of each code
        )
    Console().print(table)


def _load_extensions() -> None:
    """Let installed packages (the worker) add their commands and lend their parts; once."""
    if EXTENSIONS.loaded:
        return
    EXTENSIONS.loaded = True
    for entry in entry_points(group="pfbuild.cli"):
        # ImportError: its extras (the docker SDK, ...) are not installed here
        with contextlib.suppress(ImportError):
            entry.load()(app, EXTENSIONS)


def _command_of(argv: list[str]) -> str | None:
    """The command ``argv`` names (the group itself takes no option but --help)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code instead of calling ``sys.exit`` itself.

    A client command loads no entry point: its start-up is the client's alone."""
    if _command_of(sys.argv[1:] if argv is None else argv) not in CLIENT_COMMANDS:
        _load_extensions()
    try:
        app(args=argv, prog_name="pfbuild")  # standalone: usage errors print one line, exit 2
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else ExitCode.INTERNAL
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # a bug of ours: still one JSON error on stdout, the traceback only on stderr
        traceback.print_exc(file=sys.stderr)
        emit({"error": {"type": "internal_error", "message": f"{type(exc).__name__}: {exc}"}})
        return ExitCode.INTERNAL
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
