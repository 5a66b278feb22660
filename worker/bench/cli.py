"""``pfbuild bench``: benchmarks that print ratios measured side by side in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pfbuild.client.console import emit, settings_of

__all__ = ["bench_app"]

bench_app = typer.Typer(help="Benchmarks that print ratios measured side by side.")

# the options most benches share
Repo = Annotated[Path, typer.Option(help="Repository with a repo_profile.json.")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine output.")]
HELLO = Path("examples/hello")


def _report(name: str, payload: dict[str, Any], as_json: bool, title: str,
            columns: list[str], rows: list[dict[str, Any]]) -> bool:
    """The benchmark's JSON (``{"benchmark": name, **payload}``) with ``as_json``, else a
    table of ``rows``' ``columns``; whether it was JSON."""
    if as_json:
        emit({"benchmark": name, **payload})
        return True
    _print_table(title, columns, [[row[c] for c in columns] for row in rows])
    return False


def _print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    Console(width=200).print(table)


@bench_app.command("tarball")
def bench_tarball(
    ctx: typer.Context,
    tag: Annotated[str, typer.Option(help="An image in the engine to save and load.")],
    rounds: Annotated[int, typer.Option(help="Rounds to run.")] = 2,
    as_json: AsJson = False,
) -> None:
    """pfbuild's zstd tarball save/load vs `docker save`/`docker load`, and peak memory."""
    from pfbuild.worker.bench.measures import tarball_bench

    title = "tarball: pfbuild vs docker CLI"
    rows = tarball_bench(settings_of(ctx), tag, rounds)
    if as_json:
        emit({"benchmark": title, "rows": rows})
        return
    # one row per measure, one column per round: the ratios read down a column
    columns = ["measure", *(f"#{i + 1}" for i in range(len(rows)))]
    _print_table(title, columns, [[key, *(row[key] for row in rows)] for key in rows[0]])


@bench_app.command("queue")
def bench_queue(
    ctx: typer.Context,
    repo: Repo = HELLO,
    rounds: Annotated[int, typer.Option(help="Cache-hit rounds.")] = 20,
    builds: Annotated[int, typer.Option(help="Real-build rounds.")] = 2,
    submits: Annotated[int, typer.Option(help="Concurrent submits of one profile.")] = 50,
    as_json: AsJson = False,
) -> None:
    """The queue's overhead, on a redis-server and a celery worker it starts itself."""
    from pfbuild.worker.bench.measures import queue_bench

    rows = queue_bench(settings_of(ctx), repo, rounds=rounds, builds=builds, submits=submits)
    _report("queue", {"rows": rows}, as_json, "queue: pfbuild vs baseline (same run)",
            ["measure", "baseline_s", "pfbuild_s", "ratio", "goal"], rows)


@bench_app.command("cli")
def bench_cli(
    ctx: typer.Context,
    repo: Repo = HELLO,
    rounds: Annotated[int, typer.Option(help="Alternating rounds.")] = 20,
    as_json: AsJson = False,
) -> None:
    """A hit through the command line (embedded, `build`, farm) vs the docker SDK script
    and the interpreter's start-up, in alternating rounds of fresh processes."""
    from pfbuild.worker.bench.clibench import cli_bench

    rows = cli_bench(settings_of(ctx), repo, rounds)
    columns = ["measure", "baseline", "wall_s", "baseline_wall_s", "ratio_wall", "cpu_s",
               "baseline_cpu_s", "ratio_cpu", "goal", "met"]
    _report("cli", {"rows": rows}, as_json, "cli: a hit through the command line (same run)",
            columns, rows)


@bench_app.command("new-profile")
def bench_new_profile(
    ctx: typer.Context,
    repo: Repo = HELLO,
    rounds: Annotated[int, typer.Option(help="Alternating rounds.")] = 5,
    python: Annotated[
        str | None, typer.Option(help="Python whose pfbuild runs the CLI and the worker.")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """A new profile through the CLI's embedded default and through a farm, against a bare
    `docker build` (classic builder) of the same Dockerfile; when its tarball lands."""
    import sys

    from pfbuild.worker.bench.newprofile import new_profile_bench

    result = new_profile_bench(settings_of(ctx), repo, rounds, python or sys.executable)
    columns = ["measure", "baseline_s", "pfbuild_s", "ratio", "goal", "met",
               "tarball_landed_after_answer_s"]
    if _report("new-profile", result, as_json,
               "new profile: pfbuild vs a bare docker build (same run)", columns, result["rows"]):
        return
    after = result["after_rmi"]
    _print_table("after docker rmi", list(after), [list(after.values())])


@bench_app.command("digest")
def bench_digest(
    megabytes: Annotated[int, typer.Option(help="Size of the tree.")] = 200,
    files: Annotated[int, typer.Option(help="Files in the tree.")] = 2000,
    as_json: AsJson = False,
) -> None:
    """The context digest's cost per MB of tree, cold and warm (stat cache)."""
    from pfbuild.worker.bench.measures import digest_bench

    rows = digest_bench(megabytes, files)
    _report("digest", {"rows": rows}, as_json, "context digest", list(rows[0]), rows)


@bench_app.command("hosts")
def bench_hosts(
    ctx: typer.Context,
    host_b: Annotated[str, typer.Option(help="The second engine (DOCKER_HOST syntax).")],
    registry: Annotated[
        str | None, typer.Option(help="host:port of the registry (default PFBUILD_REGISTRY).")
    ] = None,
    repo: Repo = HELLO,
    profiles: Annotated[int, typer.Option(help="Distinct profiles.")] = 20,
    submits: Annotated[int, typer.Option(help="Submits of each profile.")] = 10,
) -> None:
    """Two engines, a registry: builds per profile, hits on a holder, registry vs tarball."""
    from pfbuild.client.console import fail
    from pfbuild.client.errors import BadRequest
    from pfbuild.worker.bench.hosts import hosts_bench

    settings = settings_of(ctx)
    registry = registry or settings.registry
    if not registry:
        raise fail(BadRequest("give --registry or set PFBUILD_REGISTRY"))
    settings = settings.model_copy(update={"registry": registry})
    result = hosts_bench(
        settings, repo, host_b=host_b, registry=registry, profiles=profiles, submits=submits
    )
    emit({"benchmark": "hosts", **result})


@bench_app.command("agents")
def bench_agents(
    ctx: typer.Context,
    repo: Repo = HELLO,
    processes: Annotated[int, typer.Option(help="Agent processes.")] = 8,
    threads: Annotated[int, typer.Option(help="Agents (threads) per process.")] = 25,
    seconds: Annotated[float, typer.Option(help="Seconds each timed round runs.")] = 20.0,
    rounds: Annotated[int, typer.Option(help="Rounds of each kind, alternated.")] = 2,
    host_b: Annotated[
        str | None, typer.Option(help="A second engine: one worker on each (else both here).")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Many agents, each its own checkout: pfbuild hits vs a bare Celery task, same workers."""
    from pfbuild.worker.bench.agents import agents_bench

    result = agents_bench(
        settings_of(ctx), repo, processes=processes, threads=threads, seconds=seconds,
        rounds=rounds, host_b=host_b,
    )
    rows = result["rounds"]
    ratios = "; ".join(
        f"{key[6:]}/bare {', '.join(f'{r:.2f}' for r in value['per_round'])} "
        f"(median {value['median']:.2f})"
        for key, value in result.items()
        if key.startswith("ratio_")
    )
    title = f"agents: {result['agents']}, workers {result['workers']}; calls/s {ratios}"
    _report("agents", result, as_json, title, list(rows[0]), rows)
