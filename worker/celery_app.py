"""The worker's Celery app: ``celery -A pfbuild.worker worker`` (or ``pfbuild worker``)."""

from __future__ import annotations

from celery import Celery

from pfbuild.client.queue import make_celery
from pfbuild.client.settings import Settings
from pfbuild.worker.hosts import install as install_host
from pfbuild.worker.tasks import register

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, redis_url: str | None = None) -> Celery:
    """A Celery app with the build task registered, configured from ``settings``."""
    settings = settings or Settings()
    app = make_celery(settings, redis_url, name="pfbuild.worker")
    register(app, settings)
    install_host(app, settings)  # its own queue, heartbeat and images held, in Redis
    return app
