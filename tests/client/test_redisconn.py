"""The one door to Redis: a redis:// URL as before, Celery's Sentinel form read once and
handed to redis-py, kombu and Celery's backend alike."""

from __future__ import annotations

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from pfbuild.client.errors import QueueUnavailable
from pfbuild.client.queue import PollingRedisBackend, PollingSentinelBackend, make_celery
from pfbuild.client.redisconn import (
    SentinelUrl,
    canonical_url,
    connect,
    over_sentinel,
    parse_sentinel_url,
)
from pfbuild.client.settings import Settings

BRIEF = "sentinel://:s3cret@10.0.0.1:26379;sentinel://10.0.0.2:26380;sentinel://10.0.0.3/2"


def test_the_sentinel_form_is_read_with_password_and_db_from_any_entry() -> None:
    parsed = parse_sentinel_url(BRIEF)
    assert parsed == SentinelUrl(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379)),
        db=2,
        password="s3cret",
    )


def test_celery_is_given_password_and_db_on_every_entry() -> None:
    """Celery's backend and kombu read them from the first entry: written on each, the
    broker, the backend and pfbuild's own clients all land in database 2."""
    assert canonical_url(BRIEF) == (
        "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://:s3cret@10.0.0.2:26380/2;"
        "sentinel://:s3cret@10.0.0.3:26379/2"
    )
    assert canonical_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    "url",
    [
        "sentinel://a:1/1;sentinel://b:2/2",  # two databases
        "sentinel://:x@a:1;sentinel://:y@b:2",  # two passwords
        "sentinel://a:1;redis://b:2",  # not a Sentinel
        "sentinel://a:port",  # no port number
        "sentinel://;",  # no Sentinel at all
    ],
)
def test_a_sentinel_url_that_cannot_be_read_is_refused(url: str) -> None:
    with pytest.raises(QueueUnavailable):
        parse_sentinel_url(url)


def test_a_redis_url_makes_the_client_it_always_made() -> None:
    client = connect("redis://127.0.0.1:1/3", Settings(), socket_timeout=2)
    assert type(client.connection_pool) is redis.ConnectionPool and not over_sentinel(client)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["port"], kwargs["db"], kwargs["socket_timeout"]) == (1, 3, 2)


def test_a_sentinel_url_makes_a_client_of_the_named_master() -> None:
    settings = Settings(redis_sentinel_master="farm")
    client = connect(BRIEF, settings, socket_timeout=2)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and over_sentinel(client)
    assert pool.service_name == "farm"
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], kwargs["socket_timeout"]) == (2, "s3cret", 2)
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380, 26379]
    # the Sentinels are asked briefly and without the master's password
    first = sentinels[0].connection_pool.connection_kwargs
    assert first["socket_timeout"] == 1.0 and first.get("password") is None


def test_the_celery_app_goes_through_sentinel_with_the_master_name() -> None:
    settings = Settings(redis_sentinel_master="farm", redis_outage_tolerance=30)
    app = make_celery(settings, BRIEF, socket_timeout=2)
    assert app.conf.broker_url == canonical_url(BRIEF)
    assert app.conf.broker_transport_options["master_name"] == "farm"
    options = app.conf.result_backend_transport_options
    assert options["master_name"] == "farm" and options["retry_policy"]["max_retries"] == 30
    backend = app.backend
    assert isinstance(backend, PollingSentinelBackend)
    pool = backend.client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "farm"
    assert pool.connection_kwargs["db"] == 2


def test_a_redis_url_keeps_the_celery_app_as_it_was() -> None:
    app = make_celery(Settings(), "redis://127.0.0.1:1/0", socket_timeout=2)
    assert app.conf.broker_url == "redis://127.0.0.1:1/0"
    assert type(app.backend) is PollingRedisBackend
    assert not app.conf.broker_transport_options
    assert not app.conf.result_backend_transport_options


def test_the_worker_stores_results_over_sentinel_its_own_way() -> None:
    from pfbuild.worker.celery_app import create_app
    from pfbuild.worker.farm.results import ResultStore, SentinelResultStore

    app = create_app(Settings(redis_sentinel_master="farm", metrics_port=0), BRIEF)
    assert isinstance(app.backend, SentinelResultStore) and isinstance(app.backend, ResultStore)
    options = app.conf.broker_transport_options
    # the worker's own broker options are added to the Sentinel's, not put in their place
    assert options["master_name"] == "farm" and options["visibility_timeout"] == 120
