"""``pfbuild top``: the farm at a glance, read from Redis alone (docs/design.md,
"Operating the farm").

Hosts and their heartbeats (the hosts registry, where installed), queue depth, running
jobs with stage and step, recent failures by class, cache hit rate by tier, and disk
used against the garbage collector's budget on each host. ``--json`` prints one
snapshot; otherwise a live ``rich`` view refreshes until Ctrl-C.
"""

from __future__ import annotations

import importlib
import json
import time
from collections import Counter
from typing import Annotated, Any

import redis
import typer

from pfbuild.client.console import emit, fail, settings_of
from pfbuild.client.errors import PfbuildError, QueueUnavailable
from pfbuild.client.jobs import BuildClient
from pfbuild.client.queue import QUEUE, Keys

__all__ = ["farm_view", "top"]

_FAILURES_SHOWN = 10
_TIERS = ("local", "tarball", "built")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _registry_hosts(client: redis.Redis) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Hosts and their own queues' depths from the hosts registry, where installed."""
    try:
        hosts = importlib.import_module("pfbuild.client.hosts")
    except ImportError:
        return [], {}
    found = [h.model_dump(mode="json") for h in hosts.list_hosts(client, with_images=False)]
    queues = {hosts.host_queue(h["host_id"]): int(h.get("queued") or 0) for h in found}
    return found, queues


def _running(client: BuildClient, max_age: float) -> list[dict[str, Any]]:
    """Jobs in a slot now, with the stage and step their worker last published."""
    now = time.time()
    jobs = []
    for raw_id, raw in client.redis.hgetall(Keys.running()).items():
        job_id, entry = _text(raw_id), json.loads(raw)
        if now - float(entry.get("since") or 0) > max_age:
            continue  # its worker died without a word; the hash expires on its own
        status = client.job(job_id).status()
        jobs.append(
            {
                "job_id": job_id,
                **entry,
                "seconds": round(now - float(entry.get("since") or now), 1),
                "stage": status.stage,
                "step": status.step,
                "steps": status.steps,
                "line": (status.line or "")[:120] or None,
            }
        )
    return sorted(jobs, key=lambda j: j["since"])


def _disk(client: redis.Redis, hosts: set[str]) -> dict[str, Any]:
    """Each host's last garbage collection report: what it holds against its budget."""
    names = {_text(k) for k in client.scan_iter(match=Keys.gc_report("*"), count=500)}
    names |= {Keys.gc_report(h) for h in hosts}
    ordered = sorted(names)
    reports = client.mget(ordered) if ordered else []
    prefix = Keys.gc_report("")
    return {k[len(prefix) :]: json.loads(v) for k, v in zip(ordered, reports, strict=True) if v}


def farm_view(client: BuildClient) -> dict[str, Any]:
    """One snapshot of the farm, as ``pfbuild top --json`` prints it."""
    r = client.redis
    hosts, queues = _registry_hosts(r)
    queues[QUEUE] = int(r.llen(QUEUE))
    running = _running(client, max_age=client.settings.build_time_limit)
    failures = [json.loads(x) for x in r.lrange(Keys.failures(), 0, -1)]
    stats = {_text(k): int(v) for k, v in r.hgetall(Keys.stats()).items()}
    answers = sum(stats.get(f"source:{t}", 0) for t in _TIERS)
    known = {h["host_id"] for h in hosts} | {j.get("host", "") for j in running}
    disk = _disk(r, known)
    for host_id in sorted((set(disk) | known) - {h["host_id"] for h in hosts} - {""}):
        hosts.append({"host_id": host_id, "alive": None})  # seen, but no heartbeat known
    return {
        "at": time.time(),
        "hosts": hosts,
        "queue_depth": sum(queues.values()),
        "queues": queues,
        "running": running,
        "recent_failures": failures[:_FAILURES_SHOWN],
        "failures_by_class": dict(
            Counter(f.get("failure_class") or f.get("type") for f in failures).most_common()
        ),
        "cache": {
            "answers": answers,
            **{
                f"{t}_rate": round(stats.get(f"source:{t}", 0) / answers, 3) if answers else None
                for t in _TIERS
            },
        },
        "disk": disk,
    }


def _mb(n: Any) -> str:
    return "?" if n is None else f"{int(n) / 1e6:,.0f} MB"


def render(view: dict[str, Any]) -> Any:
    """The snapshot as rich tables."""
    from rich.console import Group
    from rich.table import Table

    head = Table.grid(padding=(0, 3))
    cache = view["cache"]
    head.add_row(
        f"[bold]queue[/bold] {view['queue_depth']}",
        f"[bold]running[/bold] {len(view['running'])}",
        f"[bold]answers[/bold] {cache['answers']}",
        "hit rate " + " ".join(f"{t} {cache[f'{t}_rate'] or 0:.0%}" for t in _TIERS),
    )
    hosts = Table(
        "host", "alive", "engine", "seen (s ago)", "images / budget", "image disk", "tarballs"
    )
    for h in view["hosts"]:
        d = view["disk"].get(h["host_id"], {})
        tar = sum((d.get("tarball_bytes") or {}).values()) if d else None
        hosts.add_row(
            h["host_id"],
            {True: "yes", False: "NO", None: "?"}[h.get("alive")],
            {True: "up", False: "DOWN", None: "?"}[h.get("engine_ok")],
            str(h.get("seconds_since_seen") or "-"),
            f"{d.get('images', '?')} / {d.get('max_images') or '∞'}" if d else "?",
            _mb(d.get("image_bytes")),
            f"{_mb(tar)} / {_mb(d.get('max_tarball_bytes'))}",
        )
    jobs = Table("job", "profile", "host", "stage", "step", "for (s)")
    for j in view["running"]:
        step = f"{j['step']}/{j['steps']}" if j.get("step") else ""
        jobs.add_row(
            j["job_id"][:8], j["profile_id"][:16], j["host"], j["stage"], step, str(j["seconds"])
        )
    fails = Table("when (s ago)", "class", "profile", "host")
    for f in view["recent_failures"]:
        fails.add_row(
            str(round(view["at"] - f["at"])),
            str(f.get("failure_class") or f["type"]),
            str(f["profile_id"])[:16],
            str(f["host"]),
        )
    return Group(head, hosts, jobs, fails)


def top(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One snapshot as JSON.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 2.0,
) -> None:
    """The farm at a glance: hosts, queue, running jobs, failures, cache hits, disk."""
    try:
        with BuildClient(settings=settings_of(ctx)) as client:
            if as_json:
                emit(farm_view(client))
                return
            _live(client, interval)
    except redis.RedisError as exc:
        raise fail(QueueUnavailable(f"cannot read the farm's Redis: {exc}")) from None
    except PfbuildError as exc:
        raise fail(exc) from None


def _live(client: BuildClient, interval: float) -> None:
    from rich.live import Live

    with Live(render(farm_view(client)), auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            live.update(render(farm_view(client)), refresh=True)
