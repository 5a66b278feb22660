"""A worker's Prometheus metrics (docs/design.md, "Operating the farm").

Celery's prefork pool runs jobs in child processes, so the metrics use
``prometheus_client``'s multiprocess mode: each process writes its samples to files in
one folder (``Settings.metrics_dir``, emptied when the worker starts), and the worker's
main process serves their sum on ``Settings.metrics_port``. ``prometheus_client`` picks
its mode when a metric is made, so nothing here makes one before :func:`prepare` has
named the folder; a process that never calls it (the embedded farm, unit tests) counts
into a registry of its own, :func:`registry`.

Names follow Prometheus' conventions: ``pfbuild_`` prefix, base units (seconds, bytes),
``_total`` for counters.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from pfbuild.client.queue import QUEUE
from pfbuild.client.redisconn import connect
from pfbuild.client.settings import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

__all__ = ["Metrics", "metrics", "prepare", "process_exited", "registry", "serve"]

log = logging.getLogger(__name__)

_ENV = "PROMETHEUS_MULTIPROC_DIR"
# from a cache hit (milliseconds) to a long build (an hour)
_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    """Every metric a worker keeps; made once per process by :func:`metrics`."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: tuple[str, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=_BUCKETS, registry=registry)

        self.jobs = counter("pfbuild_jobs", "Jobs finished, by outcome and cache source.",
                            ("outcome", "cache_source"))
        self.failures = counter(
            "pfbuild_job_failures", "Jobs failed, by error type and failure class.",
            ("error_type", "failure_class"),
        )
        self.stage_seconds = histogram(
            "pfbuild_stage_seconds", "Seconds a job spent in each stage.", ("stage",)
        )
        self.running = Gauge(
            "pfbuild_jobs_running",
            "Jobs running in a worker slot.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.lock_waits = counter("pfbuild_lock_waits", "Times a job found its profile "
                                  "locked and came back later.")
        self.ladder_retries = counter(
            "pfbuild_ladder_retries",
            "Build attempts retried with the next variant, by the "
            "failure class that made them retry.",
            ("failure_class",),
        )
        self.tarball_bytes = counter(
            "pfbuild_tarball_bytes",
            "Bytes of image tarballs, written (saved) or read (loaded).",
            ("direction",),
        )
        self.registry_bytes = counter(
            "pfbuild_registry_bytes",
            "Layer bytes moved to (written, pushed) or from (read, pulled) the registry; "
            "layers the other side held already are not counted.",
            ("direction",),
        )
        self.publishes = counter(
            "pfbuild_publishes", "Publications of new images finished after their answers, "
            "by kind (tarball, registry) and outcome (done, failed).", ("kind", "outcome"),
        )
        self.publish_seconds = histogram(
            "pfbuild_publish_seconds", "Seconds each publication of a new image took.", ("kind",)
        )
        self.engine_errors = counter(
            "pfbuild_engine_errors", "Jobs ended by an engine error, by type.", ("error_type",)
        )
        self.gc_removed = counter(
            "pfbuild_gc_removed", "Images and tarballs garbage collected, by kind.", ("kind",)
        )
        self.gc_freed_bytes = counter(
            "pfbuild_gc_freed_bytes", "Bytes garbage collection freed, by kind.", ("kind",)
        )


@functools.cache
def registry() -> CollectorRegistry | None:
    """The registry this process counts into; None in multiprocess mode (files instead)."""
    if os.environ.get(_ENV):
        return None
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


@functools.cache
def metrics() -> Metrics:
    """This process' metrics, made on first use (after :func:`prepare`, in a worker)."""
    return Metrics(registry())


def prepare(settings: Settings) -> Path:
    """Name and empty the multiprocess folder; call in the worker's main process before
    its pool starts (children inherit the environment)."""
    folder = settings.metrics_dir or Path(tempfile.mkdtemp(prefix="pfbuild-metrics-"))
    if folder.exists():
        shutil.rmtree(folder)  # samples of an earlier run would add to this one's
    folder.mkdir(parents=True)
    os.environ[_ENV] = str(folder)
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # in case it was imported before
    registry.cache_clear()
    metrics.cache_clear()
    return folder


def process_exited(pid: int) -> None:
    """Drop a dead pool process' live gauges (its counters still count)."""
    if os.environ.get(_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class _QueueDepth:
    """A collector that reads the queue's depth from Redis when Prometheus scrapes."""

    def __init__(self, redis_url: str, settings: Settings) -> None:
        self.redis = connect(redis_url, settings, socket_timeout=2)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "pfbuild_queue_depth", "Jobs waiting in the broker's queue.", labels=["queue"]
        )
        try:
            family.add_metric([QUEUE], float(self.redis.llen(QUEUE)))
        except redis.RedisError as exc:
            log.warning("queue depth unavailable: %s", exc)
            return
        yield family


def serve(settings: Settings, redis_url: str | None) -> Any:
    """Serve the summed metrics on ``settings.metrics_port``; the server, or None."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    if not settings.metrics_port:
        return None
    served = CollectorRegistry()
    if os.environ.get(_ENV):
        MultiProcessCollector(served)  # type: ignore[no-untyped-call]
    else:
        own = registry()
        if own is not None:
            served.register(_Forward(own))
    if redis_url:
        served.register(_QueueDepth(redis_url, settings))
    try:
        server, _thread = start_http_server(settings.metrics_port, registry=served)
    except OSError as exc:
        log.warning("no metrics endpoint: port %d: %s", settings.metrics_port, exc)
        return None
    log.info("metrics on http://0.0.0.0:%d/metrics", settings.metrics_port)
    return server


class _Forward:
    """Serve another registry's metrics from this one (single-process mode)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        yield from self.source.collect()
