"""The embedded default: a broker and a worker inside the calling process.

With no ``PFBUILD_REDIS_URL``, ``pfbuild submit --wait`` needs no Redis: fakeredis serves
the Redis protocol on a loopback port and a threaded Celery worker runs the same task
code a real worker does, so the README's main command goes through the real queue path.
A new image is published (its tarball saved) by a process of its own, started once the
answer is stored, which outlives the command (``Settings.publish_detached``; see
docs/design.md, "Publishing"): the command exits as soon as it has printed its answer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pfbuild.client.settings import Settings

__all__ = ["embedded_farm", "fake_redis_server"]


@contextmanager
def fake_redis_server() -> Iterator[str]:
    """fakeredis serving the Redis protocol on a free loopback port; yields its URL."""
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    thread = threading.Thread(target=server.serve_forever, name="pfbuild-fake-redis", daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield f"redis://{host!s}:{port}/0"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def embedded_farm(settings: Settings, concurrency: int = 2) -> Iterator[str]:
    """Yield the URL of an in-process Redis with a worker consuming from it."""
    from celery.contrib.testing.worker import start_worker

    from pfbuild.worker.celery_app import create_app

    with fake_redis_server() as url:
        # no metrics endpoint nor periodic collection for a one-shot, in-process farm; a
        # new image is published by a process of its own, which outlives the command
        quiet = settings.model_copy(
            update={"metrics_port": 0, "gc_interval_seconds": 0, "publish_detached": True}
        )
        app = create_app(quiet, url)
        worker = start_worker(
            app,
            pool="threads",
            concurrency=concurrency,
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=5.0,
        )
        worker.__enter__()
        body_failed = True
        try:
            yield url
            body_failed = False
        finally:
            try:
                worker.__exit__(None, None, None)
            except RuntimeError:
                # a build still running in a worker thread (after a timeout or Ctrl-C):
                # the caller's own error is the one to report; the thread dies with us
                if not body_failed:
                    raise
