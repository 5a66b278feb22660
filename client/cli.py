"""The ``pfbuild`` command line: parsing here, doing elsewhere.

Every command prints JSON on stdout for machines (the answer, or ``{"error": {...}}``)
and readable progress on stderr when it is a terminal. Exit codes are named in
:class:`~pfbuild.client.errors.ExitCode`. Commands that need a Docker engine import the
worker lazily, so the client stays installable without the docker SDK.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from pfbuild.client.errors import BadRequest, ExitCode, JobTimeout, PfbuildError
from pfbuild.client.models import BuildRequest
from pfbuild.client.profile import validate_request
from pfbuild.client.settings import Settings

__all__ = ["app", "main", "parse_request"]

app = typer.Typer(
    name="pfbuild",
    help="Build farm for deterministic Docker images of repositories.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def parse_request(text: str) -> BuildRequest:
    """A request from JSON text; every problem is a BadRequest naming the field."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the request is not valid JSON: {exc}") from None
    return validate_request(data)


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    sys.stdout.flush()


def _fail(exc: PfbuildError) -> typer.Exit:
    _emit({"error": exc.to_info().model_dump(mode="json", exclude_none=True)})
    return typer.Exit(exc.exit_code)


def _progress_printer() -> Any:
    """A progress callback that writes stage changes (and build steps) to a terminal."""
    if not sys.stderr.isatty():
        return lambda stage, **info: None
    from rich.console import Console

    console = Console(stderr=True)
    last: dict[str, Any] = {}

    def show(stage: str, **info: Any) -> None:
        step = info.get("step")
        key = (stage, step)
        if last.get("key") == key:
            return
        last["key"] = key
        where = f" step {step}/{info.get('steps')}" if step else ""
        line = (info.get("line") or "").strip()
        console.print(f"[bold]{stage}[/bold]{where} {line[:100]}", highlight=False)

    return show


@app.command()
def build() -> None:
    """Build one request read from stdin (the seed's contract); the answer goes to stdout."""
    from pfbuild.worker.engine import DockerEngine
    from pfbuild.worker.pipeline import run_build

    settings = Settings()
    try:
        request = parse_request(sys.stdin.read())
        engine = DockerEngine(settings.docker_host_name(), timeout=settings.docker_timeout)
        answer = run_build(request, settings, engine, progress=_progress_printer())
    except PfbuildError as exc:
        raise _fail(exc) from None
    _emit(answer.model_dump(mode="json"))


@app.command("base-image")
def base_image(
    python: Annotated[str, typer.Option(help="Python version of the image.")] = "3.11",
    ca_dir: Annotated[
        Path | None, typer.Option(help="Folder of extra CA certificates (*.crt) to trust.")
    ] = None,
    mirror: Annotated[str | None, typer.Option(help="Debian mirror (default: apt's).")] = None,
    force: Annotated[bool, typer.Option(help="Remake the image even if it exists.")] = False,
    pull: Annotated[bool, typer.Option(help="Try pulling from a registry first.")] = True,
) -> None:
    """Make the base image (python:X.Y-slim) from Debian's packages when it cannot be pulled."""
    from pfbuild.worker.baseimage import ensure_base_image
    from pfbuild.worker.engine import DockerEngine

    settings = Settings()
    image = settings.base_image(python)
    try:
        engine = DockerEngine(settings.docker_host_name(), timeout=settings.docker_timeout)
        how = ensure_base_image(
            engine,
            image,
            ca_dir=ca_dir,
            mirror=mirror,
            force=force,
            pull=pull,
            say=lambda msg: typer.echo(msg, err=True),
        )
        info = engine.inspect(image)
    except PfbuildError as exc:
        raise _fail(exc) from None
    _emit({"image": image, "how": how, "image_id": info.id if info else None})


def _read_request(
    repo_dir: str | None, profile: str | None, force: bool, cache_dir: str | None
) -> BuildRequest:
    if repo_dir is None:
        if sys.stdin.isatty():
            raise BadRequest("give --repo-dir and --profile, or a request object on stdin")
        return parse_request(sys.stdin.read())
    if profile is None:
        raise BadRequest("--profile is required with --repo-dir")
    data: dict[str, Any] = {"repo_dir": repo_dir, "profile_path": profile, "force_rebuild": force}
    if cache_dir:
        data["image_cache_dir"] = cache_dir
    return parse_request(json.dumps(data))


def _watch(job: Any, timeout: float | None, show: bool) -> Any:
    """Wait for ``job``, showing stage and build step on a terminal as they change."""
    if not show:
        return job.result(timeout)
    from rich.console import Console

    console = Console(stderr=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    with console.status(f"job {job.id}: queued") as spinner:
        while True:
            st = job.status()
            step = f" step {st.step}/{st.steps}" if st.step else ""
            line = (st.line or "").strip()[:90]
            spinner.update(f"job {job.id}: [bold]{st.stage}[/bold]{step} {line}")
            if st.ready or (deadline is not None and time.monotonic() > deadline):
                return job.result(timeout=0)
            time.sleep(0.3)


@app.command()
def submit(
    repo_dir: Annotated[str | None, typer.Option(help="Repository to build.")] = None,
    profile: Annotated[str | None, typer.Option(help="Path of its repo_profile.json.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if cached.")] = False,
    cache_dir: Annotated[str | None, typer.Option(help="Tarball cache folder.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait and print the answer.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait at most.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine output only.")] = False,
) -> None:
    """Submit a build (a request on stdin, or flags) to the farm; --wait for its answer.

    With no PFBUILD_REDIS_URL, --wait runs an embedded broker and worker in this process.
    """
    from pfbuild.client.jobs import BuildClient

    settings = Settings()
    show = not as_json and sys.stderr.isatty()
    try:
        request = _read_request(repo_dir, profile, force, cache_dir)
        if settings.redis_url is None:
            if not wait:
                raise BadRequest(
                    "PFBUILD_REDIS_URL is not set: use --wait to build on the "
                    "embedded broker and worker, or point it at the farm's Redis"
                )
            from pfbuild.worker.embedded import embedded_farm

            with embedded_farm(settings) as url, BuildClient(url, settings) as client:
                job = client.submit(request)
                try:
                    answer = _watch(job, timeout, show)
                except (JobTimeout, KeyboardInterrupt) as exc:
                    # The build goes on in a worker thread of this very process, which
                    # nothing can interrupt: report now and leave at once (the engine
                    # stops the build when its connection closes with the process).
                    code = 130
                    if isinstance(exc, JobTimeout):
                        code = _fail(exc).exit_code
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
        else:
            with BuildClient(settings=settings) as client:
                job = client.submit(request)
                if not wait:
                    _emit({"job_id": job.id, "profile_id": job.profile_id, "joined": job.joined})
                    return
                answer = _watch(job, timeout, show)
    except PfbuildError as exc:
        raise _fail(exc) from None
    _emit(answer.model_dump(mode="json"))


def _client() -> Any:
    from pfbuild.client.jobs import BuildClient

    return BuildClient()


@app.command()
def status(job_id: str) -> None:
    """Print a job's state, stage, build step and last log line."""
    try:
        with _client() as client:
            _emit(client.job(job_id).status().model_dump(mode="json"))
    except PfbuildError as exc:
        raise _fail(exc) from None


@app.command("wait")
def wait_cmd(
    job_id: str,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait at most.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine output only.")] = False,
) -> None:
    """Wait for a job and print its answer (or its structured error)."""
    try:
        with _client() as client:
            answer = _watch(client.job(job_id), timeout, not as_json and sys.stderr.isatty())
    except PfbuildError as exc:
        raise _fail(exc) from None
    _emit(answer.model_dump(mode="json"))


@app.command()
def logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
) -> None:
    """Print a job's build log lines (all so far; with -f, then live ones)."""
    try:
        with _client() as client:
            for line in client.job(job_id).logs(follow=follow):
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
    except PfbuildError as exc:
        raise _fail(exc) from None


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a job (terminating its build if it runs)."""
    try:
        with _client() as client:
            client.job(job_id).cancel()
    except PfbuildError as exc:
        raise _fail(exc) from None
    _emit({"job_id": job_id, "cancelled": True})


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(help="Builds at once.")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
) -> None:
    """Start a worker (same as `celery -A pfbuild.worker worker`)."""
    from pfbuild.worker.celery_app import create_app

    settings = Settings()
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--concurrency={concurrency or settings.worker_concurrency}",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    create_app(settings).worker_main(argv)


@app.command()
def hosts(
    as_json: Annotated[bool, typer.Option("--json", help="Machine output.")] = False,
) -> None:
    """List the farm's hosts: liveness, running jobs and the images each engine holds."""
    import redis

    from pfbuild.client.errors import QueueUnavailable
    from pfbuild.client.hosts import list_hosts

    settings = Settings()
    try:
        if not settings.redis_url:
            raise QueueUnavailable("set PFBUILD_REDIS_URL to the farm's Redis")
        try:
            found = list_hosts(redis.Redis.from_url(settings.redis_url))
        except redis.RedisError as exc:
            raise QueueUnavailable(f"cannot reach Redis: {exc}") from None
    except PfbuildError as exc:
        raise _fail(exc) from None
    if as_json or not sys.stdout.isatty():
        _emit({"hosts": [h.model_dump(mode="json") for h in found]})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pfbuild hosts")
    for col in ("host", "alive", "seen (s ago)", "docker host", "running", "images"):
        table.add_column(col)
    for h in found:
        table.add_row(
            h.host_id,
            "yes" if h.alive else "DEAD",
            str(h.seconds_since_seen),
            h.docker_host or "",
            f"{len(h.running)}/{h.concurrency}",
            str(len(h.images)),
        )
    Console().print(table)


bench_app = typer.Typer(help="Benchmarks that print ratios measured side by side.")
app.add_typer(bench_app, name="bench")


def _print_rows(title: str, rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        _emit({"benchmark": title, "rows": rows})
        return
    from rich.console import Console
    from rich.table import Table

    # one row per measure, one column per round: the ratios read down a column
    table = Table(title=title)
    table.add_column("measure")
    for i in range(len(rows)):
        table.add_column(f"#{i + 1}", justify="right")
    for key in rows[0]:
        cells = [row[key] for row in rows]
        table.add_row(key, *(f"{v:.3f}" if isinstance(v, float) else str(v) for v in cells))
    Console(width=200).print(table)


@bench_app.command("tarball")
def bench_tarball(
    tag: Annotated[str, typer.Option(help="An image in the engine to save and load.")],
    rounds: Annotated[int, typer.Option(help="Rounds to run.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Machine output.")] = False,
) -> None:
    """pfbuild's zstd tarball save/load vs `docker save`/`docker load`, and peak memory."""
    from pfbuild.worker.bench import tarball_bench

    _print_rows("tarball: pfbuild vs docker CLI", tarball_bench(Settings(), tag, rounds), as_json)


@bench_app.command("queue")
def bench_queue(
    repo: Annotated[Path, typer.Option(help="Repository with a repo_profile.json.")] = Path(
        "examples/hello"
    ),
    rounds: Annotated[int, typer.Option(help="Cache-hit rounds.")] = 20,
    builds: Annotated[int, typer.Option(help="Real-build rounds.")] = 2,
    submits: Annotated[int, typer.Option(help="Concurrent submits of one profile.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Machine output.")] = False,
) -> None:
    """The queue's overhead, on a redis-server and a celery worker it starts itself."""
    from pfbuild.worker.bench import queue_bench

    rows = queue_bench(Settings(), repo, rounds=rounds, builds=builds, submits=submits)
    if as_json:
        _emit({"benchmark": "queue", "rows": rows})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="queue: pfbuild vs baseline (same run)")
    for col in ("measure", "baseline_s", "pfbuild_s", "ratio", "goal"):
        table.add_column(col)
    for row in rows:
        table.add_row(
            *(
                f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c])
                for c in ("measure", "baseline_s", "pfbuild_s", "ratio", "goal")
            )
        )
    Console(width=200).print(table)


@bench_app.command("hosts")
def bench_hosts(
    host_b: Annotated[str, typer.Option(help="The second engine (DOCKER_HOST syntax).")],
    registry: Annotated[
        str | None, typer.Option(help="host:port of the registry (default PFBUILD_REGISTRY).")
    ] = None,
    repo: Annotated[Path, typer.Option(help="Repository with a repo_profile.json.")] = Path(
        "examples/hello"
    ),
    profiles: Annotated[int, typer.Option(help="Distinct profiles.")] = 20,
    submits: Annotated[int, typer.Option(help="Submits of each profile.")] = 10,
) -> None:
    """Two engines, a registry: builds per profile, hits on a holder, registry vs tarball."""
    from pfbuild.worker.hostbench import hosts_bench

    settings = Settings()
    registry = registry or settings.registry
    if not registry:
        raise _fail(BadRequest("give --registry or set PFBUILD_REGISTRY"))
    settings = settings.model_copy(update={"registry": registry})
    result = hosts_bench(
        settings, repo, host_b=host_b, registry=registry, profiles=profiles, submits=submits
    )
    _emit({"benchmark": "hosts", **result})


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code instead of calling ``sys.exit`` itself."""
    try:
        result = app(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        return 130
    except Exception as exc:
        import click

        if isinstance(exc, click.ClickException):  # usage errors
            exc.show()
            return ExitCode.BAD_REQUEST
        # a bug of ours: still one JSON error on stdout, the traceback only on stderr
        import traceback

        traceback.print_exc(file=sys.stderr)
        _emit({"error": {"type": "internal_error", "message": f"{type(exc).__name__}: {exc}"}})
        return ExitCode.INTERNAL
    return int(result) if isinstance(result, int) else ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
