"""``pfbuild gc``: garbage collection of this host's images and tarballs, by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pfbuild.client.console import emit, fail, settings_of
from pfbuild.client.errors import BadRequest, PfbuildError, RegistryFailed
from pfbuild.client.settings import Settings

__all__ = ["gc"]


def gc(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would go; remove nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The whole result as JSON.")] = False,
    cache_dir: Annotated[
        list[Path] | None, typer.Option(help="Another tarball folder to collect (repeatable).")
    ] = None,
    registry: Annotated[
        bool,
        typer.Option(help="Also keep the shared registry under PFBUILD_GC_MAX_REGISTRY_IMAGES."),
    ] = False,
) -> None:
    """Keep this host's images and tarballs under their budgets (PFBUILD_GC_*), least
    recently used first; never what a container, a running job or a lock holds."""
    from pfbuild.client.redisconn import connect
    from pfbuild.worker.engine import engine_from_settings
    from pfbuild.worker.ops.gc import Collector

    settings = settings_of(ctx)
    try:
        api = engine_from_settings(settings).api
        client = connect(settings.redis_url, settings) if settings.redis_url else None
        result = Collector(api, settings, client).run(dry_run=dry_run, extra_dirs=cache_dir or [])
        evicted = _registry(settings, client, dry_run) if registry else []
    except PfbuildError as exc:
        raise fail(exc) from None
    if as_json:
        emit({**result.to_json(), "registry_removed": evicted})
        return
    verb = "would remove" if dry_run else "removed"
    for item in result.removed:
        typer.echo(f"{verb} {item.kind} {item.name} ({item.size / 1e6:.1f} MB)")
    for item in result.kept:
        typer.echo(f"kept {item.kind} {item.name}: {item.kept}")
    for profile_id in evicted:
        typer.echo(f"{verb} registry image of {profile_id}")
    typer.echo(
        f"{len(result.removed)} {verb}; {result.images} images (budget {result.max_images or '∞'})"
    )


def _registry(settings: Settings, client: Any, dry_run: bool) -> list[str]:
    """The registry's share of the collection; its layers go with its own collector."""
    import requests

    from pfbuild.worker.ops.registrygc import RegistryCollector

    if not settings.registry:
        raise BadRequest("--registry needs PFBUILD_REGISTRY (host:port of the registry)")
    try:
        return RegistryCollector(settings, client).run(dry_run=dry_run)
    except requests.RequestException as exc:
        raise RegistryFailed(f"cannot collect the registry {settings.registry}: {exc}") from None
