"""The worker's Celery app: ``celery -A pfbuild.worker worker`` (or ``pfbuild worker``).

The shared part (broker, backend, JSON) comes from :func:`pfbuild.client.queue.make_celery`;
what only a consuming worker needs is configured here, each setting with its reason.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery, signals

from pfbuild.client.errors import QueueUnavailable
from pfbuild.client.queue import make_celery
from pfbuild.client.settings import Settings
from pfbuild.worker.farm.hosts import install as install_host
from pfbuild.worker.farm.lockwait import start_sweeper
from pfbuild.worker.farm.publishing import start_publish_sweeper
from pfbuild.worker.farm.results import ResultStore, SentinelResultStore
from pfbuild.worker.farm.tasks import register
from pfbuild.worker.ops.hooks import install as install_ops

__all__ = ["configure_worker", "create_app"]

def configure_worker(app: Celery, settings: Settings) -> None:
    """The consumer's settings: how jobs are acknowledged, prefetched and time-limited."""
    app.conf.update(
        # Ack after the build, not before: a worker that dies mid-build leaves its job
        # in Redis' unacked set, from which another worker gets it back.
        task_acks_late=True,
        # A pool process killed under a job (OOM, SIGKILL) requeues the job rather than
        # failing it; the task caps how often (Settings.max_deliveries).
        task_reject_on_worker_lost=True,
        # One job reserved per process: a build takes minutes, and a job prefetched by a
        # busy worker would wait behind it while another worker sits idle.
        worker_prefetch_multiplier=1,
        # Redis redelivers an unacked job after visibility_timeout. A running job's
        # heartbeat keeps its delivery fresh in the unacked index (worker/farm/liveness.py), and
        # a redelivered copy is harmless, so this is short: a dead host's job comes back in
        # about visibility_timeout + 10 s, whatever the build's time limit (celery#5935).
        # Workers sweep for such orphans every 10 s (kombu's default scans only every
        # 10th sweep, so a dead worker's job would wait up to 100 s more).
        broker_transport_options={
            # the Sentinel options make_celery set, if any (master_name)
            **(app.conf.broker_transport_options or {}),
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
        },
        # The soft limit raises inside the build so it releases its lock and reports a
        # structured timeout; the hard limit kills what ignores it.
        task_soft_time_limit=settings.build_soft_time_limit,
        task_time_limit=settings.build_time_limit,
        # A broker blip (Redis restarting) must not turn a build into `cancelled`: a
        # running build goes on and stores its answer once Redis is back. Its ack may be
        # lost with the old connection; the message then comes back after the visibility
        # timeout, and the copy finds the answer stored and builds nothing (liveness.py).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Say explicitly that a worker started before Redis keeps retrying to connect.
        broker_connection_retry_on_startup=True,
        # No STARTED: the task publishes its own stages, and a STARTED stored by each lock
        # retry would send a waiting job's state backwards.
        task_track_started=False,
        worker_hijack_root_logger=False,
    )


def sweep_parked_jobs(app: Celery, settings: Settings) -> None:
    """Once ``app``'s worker is ready, sweep the lock wait lists until it shuts down: a
    job parked on a lock whose holder died is sent again by whichever worker sees it; and
    this host's publications left pending by a publisher that died are finished."""
    stop = threading.Event()

    def on_ready(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            start_sweeper(app, settings, stop)
            # and publications a publisher that died left pending (farm/publishing.py)
            start_publish_sweeper(app, settings, stop)

    def on_shutdown(**_: Any) -> None:
        stop.set()

    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)


def create_app(settings: Settings | None = None, redis_url: str | None = None) -> Celery:
    """A worker's Celery app with the build task registered, configured from ``settings``."""
    settings = settings or Settings()
    url = redis_url or settings.redis_url
    if not url:
        raise QueueUnavailable(
            "no Redis configured for the worker: set PFBUILD_REDIS_URL "
            "(`pfbuild submit --wait` runs an embedded broker and worker instead)"
        )
    app = make_celery(
        settings,
        url,
        name="pfbuild.worker",
        backend=ResultStore,
        sentinel_backend=SentinelResultStore,
        socket_timeout=settings.worker_redis_socket_timeout,
    )
    configure_worker(app, settings)
    register(app, settings)
    sweep_parked_jobs(app, settings)
    install_ops(app, settings)  # metrics, farm state, stage logs, periodic gc
    install_host(app, settings)  # its own queue, heartbeat and images held, in Redis
    return app
