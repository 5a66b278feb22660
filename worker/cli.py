"""The worker's commands of ``pfbuild``: ``build``, ``base-image``, ``worker``, ``bench``.

They join the client's command line through the ``pfbuild.cli`` entry point (see
:func:`register`), so users type ``pfbuild build`` whichever package holds the command.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pfbuild.client.cli import (
    Extensions,
    hit_fingerprint,
    parse_request,
    read_stdin,
    remember_hit,
)
from pfbuild.client.console import emit, fail, settings_of
from pfbuild.client.errors import PfbuildError
from pfbuild.client.models import JobState
from pfbuild.client.settings import Settings
from pfbuild.worker.ops.cli import gc

if TYPE_CHECKING:
    from pfbuild.worker.build.run import Progress

__all__ = ["register"]


def _progress_printer() -> Progress:
    """Stage changes (and build steps) written to a terminal; nothing otherwise."""
    from pfbuild.worker.build.run import no_progress

    if not sys.stderr.isatty():
        return no_progress
    from rich.console import Console

    console = Console(stderr=True)
    last: dict[str, Any] = {}

    def show(state: JobState, **info: Any) -> None:
        step = info.get("step")
        if last.get("key") == (state, step):
            return
        last["key"] = (state, step)
        where = f" step {step}/{info.get('steps')}" if step else ""
        line = (info.get("line") or "").strip()
        console.print(f"[bold]{state.value}[/bold]{where} {line[:100]}", highlight=False)

    return show


def build(ctx: typer.Context) -> None:
    """Build one request read from stdin (the seed's contract); the answer goes to stdout.

    A hit is the pipeline's hit check alone (no lock, as in the farm); anything else runs
    the whole pipeline under the profile's lock on this host."""
    from pfbuild.worker.build.resolve import resolve_request
    from pfbuild.worker.embedded import engine_hit_check
    from pfbuild.worker.engine import engine_from_settings
    from pfbuild.worker.pipeline import reuse_local, run_build

    settings = settings_of(ctx)
    try:
        raw = read_stdin(settings)
        resolved = resolve_request(parse_request(raw, settings), settings)
        fingerprint = hit_fingerprint(settings, raw)  # before the hit check
        engine = engine_from_settings(settings)
        answer = reuse_local(resolved, settings, engine)
        if answer is not None:
            hit = answer
            remember_hit("build", raw, fingerprint, hit, lambda: engine_hit_check(settings, hit))
        else:
            answer = run_build(resolved, settings, engine, progress=_progress_printer())
    except PfbuildError as exc:
        raise fail(exc) from None
    emit(answer.model_dump(mode="json"))


def base_image(
    ctx: typer.Context,
    python: Annotated[str, typer.Option(help="Python version of the image.")] = "3.11",
    ca_dir: Annotated[
        Path | None, typer.Option(help="Folder of extra CA certificates (*.crt) to trust.")
    ] = None,
    mirror: Annotated[str | None, typer.Option(help="Debian mirror (default: apt's).")] = None,
    force: Annotated[bool, typer.Option(help="Remake the image even if it exists.")] = False,
    pull: Annotated[bool, typer.Option(help="Try pulling from a registry first.")] = True,
) -> None:
    """Make the base image (python:X.Y-slim) from Debian's packages when it cannot be pulled."""
    from pfbuild.worker.build.baseimage import ensure_base_image
    from pfbuild.worker.engine import engine_from_settings

    settings = settings_of(ctx)
    image = settings.base_image(python)
    try:
        engine = engine_from_settings(settings)
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
        raise fail(exc) from None
    emit({"image": image, "how": how, "image_id": info.id if info else None})


def worker(
    ctx: typer.Context,
    concurrency: Annotated[int | None, typer.Option(help="Builds at once.")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
    log_format: Annotated[
        str | None, typer.Option(help="Job stage lines: text or json (PFBUILD_LOG_FORMAT).")
    ] = None,
) -> None:
    """Start a worker (same as `celery -A pfbuild.worker worker`)."""
    from pfbuild.worker.celery_app import create_app

    settings = settings_of(ctx)
    if log_format:
        settings = Settings.model_validate({**settings.model_dump(), "log_format": log_format})
    argv = [
        "worker",
        f"--loglevel={loglevel}",
        f"--concurrency={concurrency or settings.worker_concurrency}",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    try:
        app = create_app(settings)
    except PfbuildError as exc:
        raise fail(exc) from None
    app.worker_main(argv)


def register(app: typer.Typer, extensions: Extensions) -> None:
    """The ``pfbuild.cli`` entry point: add the worker's commands, lend the embedded
    default's parts."""
    from pfbuild.worker.bench.cli import bench_app
    from pfbuild.worker.embedded import answer_hit, engine_hit_check, run_embedded

    app.command()(build)
    app.command("base-image")(base_image)
    app.command()(worker)
    app.command()(gc)
    app.add_typer(bench_app, name="bench")
    extensions.embedded_run = lambda settings, request, show: run_embedded(
        settings, request, _progress_printer() if show else None
    )
    extensions.embedded_hit = answer_hit
    extensions.engine_hit_check = engine_hit_check
