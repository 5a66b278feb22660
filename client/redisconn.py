"""The one door to Redis: every Redis client and every Celery app pfbuild makes goes
through here, so a ``redis://`` URL and a Sentinel URL reach the same master.

``PFBUILD_REDIS_URL`` is either a plain ``redis://`` (or ``rediss://``, ``unix://``) URL,
used as it always was, or Celery's Sentinel form::

    sentinel://[:PASSWORD@]HOST:PORT;sentinel://HOST:PORT;sentinel://HOST:PORT[/DB]

one entry per Sentinel, with ``PFBUILD_REDIS_SENTINEL_MASTER`` naming the monitored master
(default ``mymaster``). The password is the master's (and its replicas'); the Sentinels
themselves are asked without one. The password and database may be written on any entry
(the brief form puts ``/DB`` on the last); :func:`canonical_url` writes them on every entry,
because Celery's result backend and kombu's broker read them from the first one, and
pfbuild's own clients must land in the same database as theirs.

Over Sentinel, a client is redis-py's ``Sentinel(...).master_for(...)``: each new
connection asks the Sentinels where the master is, and a connection to a master that was
demoted is dropped (redis-py turns its ``READONLY`` into a connection error). The broker
and the result backend get the same through Celery's transport options (``master_name``,
``sentinel_kwargs``). No discovery loop of pfbuild's own: a call that fails during a
promotion fails like a Redis restart does, and is retried where a restart's would be
(docs/design.md, "Redis with Sentinel").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

from pfbuild.client.errors import QueueUnavailable

if TYPE_CHECKING:
    from pfbuild.client.settings import Settings

__all__ = [
    "SENTINEL_PORT",
    "SentinelUrl",
    "canonical_url",
    "connect",
    "is_sentinel",
    "over_sentinel",
    "parse_sentinel_url",
    "transport_options",
]

SENTINEL_PORT = 26379  # a Sentinel's default port, as in kombu and redis-sentinel

# Seconds a call to a Sentinel may take (asking where the master is): a Sentinel that
# accepts but never answers is skipped for the next one, instead of hanging the caller.
_SENTINEL_SOCKET_TIMEOUT = 1.0


def is_sentinel(url: str) -> bool:
    """Whether ``url`` names Sentinels rather than a Redis server."""
    return url.strip().lower().startswith("sentinel://")


@dataclass(frozen=True)
class SentinelUrl:
    """A Sentinel URL read once: where the Sentinels are, and what the master needs."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None

    def entry(self, host: str, port: int) -> str:
        auth = ""
        if self.password is not None or self.username is not None:
            user = quote(self.username or "", safe="")
            auth = f"{user}:{quote(self.password or '', safe='')}@"
        return f"sentinel://{auth}{host}:{port}/{self.db}"


def _one_of(values: list[Any], what: str, url: str) -> Any:
    found = {v for v in values if v is not None}
    if len(found) > 1:
        raise QueueUnavailable(f"PFBUILD_REDIS_URL {_hidden(url)} names two different {what}s")
    return found.pop() if found else None


def _hidden(url: str) -> str:
    """``url`` with its passwords replaced, for error messages."""
    return ";".join(
        part if "@" not in part else "sentinel://***@" + part.rsplit("@", 1)[1]
        for part in url.split(";")
    )


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Read Celery's Sentinel form (see the module docstring); QueueUnavailable if it
    cannot name a Sentinel."""
    sentinels: list[tuple[str, int]] = []
    dbs: list[int | None] = []
    users: list[str | None] = []
    passwords: list[str | None] = []
    for part in (p.strip() for p in url.split(";")):
        if not part:
            continue
        try:
            split = urlsplit(part)
            port = split.port or SENTINEL_PORT
            path = split.path.strip("/")
            db = int(path) if path else None
        except ValueError:
            raise QueueUnavailable(f"PFBUILD_REDIS_URL: cannot read {_hidden(part)}") from None
        if split.scheme.lower() != "sentinel" or not split.hostname:
            raise QueueUnavailable(
                f"PFBUILD_REDIS_URL: {_hidden(part)} is not sentinel://HOST:PORT"
            )
        sentinels.append((split.hostname, port))
        dbs.append(db)
        users.append(unquote(split.username) if split.username else None)
        passwords.append(unquote(split.password) if split.password is not None else None)
    if not sentinels:
        raise QueueUnavailable("PFBUILD_REDIS_URL names no Sentinel")
    return SentinelUrl(
        sentinels=tuple(sentinels),
        db=_one_of(dbs, "database", url) or 0,
        username=_one_of(users, "user", url),
        password=_one_of(passwords, "password", url),
    )


def canonical_url(url: str) -> str:
    """``url`` as Celery and kombu must be given it: a ``redis://`` URL unchanged; a
    Sentinel URL with the password and database written on every entry."""
    if not is_sentinel(url):
        return url
    parsed = parse_sentinel_url(url)
    return ";".join(parsed.entry(host, port) for host, port in parsed.sentinels)


def _sentinel_kwargs(socket_timeout: float | None) -> dict[str, Any]:
    timeout = min(socket_timeout or _SENTINEL_SOCKET_TIMEOUT, _SENTINEL_SOCKET_TIMEOUT)
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout}


def connect(
    url: str,
    settings: Settings,
    *,
    socket_timeout: float | None = None,
    socket_connect_timeout: float | None = None,
) -> redis.Redis:
    """A Redis client for ``url``: ``redis.Redis.from_url`` for a Redis URL (as pfbuild
    always made them), or a client of the master the Sentinels name now, for a Sentinel
    URL (``settings.redis_sentinel_master``), that follows a failover."""
    if not is_sentinel(url):
        kwargs: dict[str, Any] = {"socket_timeout": socket_timeout}
        if socket_connect_timeout is not None:
            kwargs["socket_connect_timeout"] = socket_connect_timeout
        return redis.Redis.from_url(url, **kwargs)
    parsed = parse_sentinel_url(url)
    master: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout or socket_timeout,
        "db": parsed.db,
    }
    if parsed.username is not None:
        master["username"] = parsed.username
    if parsed.password is not None:
        master["password"] = parsed.password
    sentinel = Sentinel(
        list(parsed.sentinels), sentinel_kwargs=_sentinel_kwargs(socket_timeout), **master
    )
    client: redis.Redis = sentinel.master_for(settings.redis_sentinel_master)
    return client


def over_sentinel(client: redis.Redis) -> bool:
    """Whether ``client`` reaches its master through Sentinels (and so has replicas that
    a failover may promote)."""
    return isinstance(getattr(client, "connection_pool", None), SentinelConnectionPool)


def transport_options(url: str, settings: Settings, socket_timeout: float | None) -> dict[str, Any]:
    """What Celery's broker and result backend need besides the URL: nothing for a Redis
    URL; for a Sentinel URL, the master's name and how long a Sentinel may take."""
    if not is_sentinel(url):
        return {}
    return {
        "master_name": settings.redis_sentinel_master,
        "sentinel_kwargs": _sentinel_kwargs(socket_timeout),
    }
