"""The ``pfbuild`` command line: parsing here, doing elsewhere.

Every command prints JSON on stdout for machines (the answer, or ``{"error": {...}}``)
and readable progress on stderr when it is a terminal. Exit codes are named in
:class:`~pfbuild.client.errors.ExitCode`. Commands that need a Docker engine import the
worker lazily, so the client stays installable without the docker SDK.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from pfbuild.client.errors import BadRequest, ExitCode, PfbuildError
from pfbuild.client.models import BuildRequest
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
    if not isinstance(data, dict):
        raise BadRequest("the request must be a JSON object")
    try:
        return BuildRequest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}"
            for err in exc.errors()
        )
        raise BadRequest(f"invalid request: {problems}") from None


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


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code instead of calling ``sys.exit`` itself."""
    try:
        result = app(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        return 130
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return ExitCode.BAD_REQUEST
        raise
    return int(result) if isinstance(result, int) else ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
