"""Real services started on this machine: a ``redis-server`` (or a master, its replica
and three Sentinels) and ``celery worker`` processes. The integration tests and the
benchmarks run the farm on these, so that what they measure is the real broker and real
worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from pfbuild.worker.engine import Engine

__all__ = ["RedisServer", "SentinelSet", "Worker", "drop_image", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server on a free loopback port; without persistence, or with AOF
    (``appendfsync everysec``, as compose runs it) when ``persistent``."""

    def __init__(self, workdir: Path, *, persistent: bool = False) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.persistent = persistent
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        durability = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *durability, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return proc
            except redis.ConnectionError:
                time.sleep(0.05)
            except redis.ResponseError:  # LOADING: still reading its AOF
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def restart(self, down_for: float = 0.0) -> float:
        """SIGKILL the server (a crash: no goodbye), wait, start it again on the same
        port and files; return how long it was unreachable."""
        self.proc.kill()
        self.proc.wait(10)
        died = time.monotonic()
        time.sleep(down_for)
        self.proc = self._spawn()
        return time.monotonic() - died

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} within {timeout:.0f}s")


def _master_addr(sentinel: redis.Redis, name: str) -> int | None:
    """The master's port as this Sentinel names it, or None."""
    found: Any = sentinel.sentinel_get_master_addr_by_name(name)
    return int(found[1]) if found else None


class SentinelSet:
    """A master (AOF), one replica and three Sentinels (quorum 2) on free loopback ports,
    as README's "Redis with Sentinel" sets them up; :attr:`url` is the Sentinel URL a farm
    uses. ``down_after_ms`` is how long the Sentinels wait before they call a silent
    master down (README advises seconds; tests shorten it)."""

    def __init__(self, workdir: Path, *, master: str = "mymaster", down_after_ms: int = 1000,
                 db: int = 0) -> None:
        self.workdir, self.master = workdir, master
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.data = [free_port(), free_port()]  # the first master, and its replica
        self.sentinels = [free_port() for _ in range(3)]
        self.url = ";".join(f"sentinel://127.0.0.1:{p}" for p in self.sentinels) + f"/{db}"
        try:
            self.start_server(self.data[0])
            self.start_server(self.data[1], replica_of=self.data[0])
            for port in self.sentinels:
                self._start_sentinel(port, down_after_ms)
            self.wait_ready(self.data[0])
        except BaseException:
            self.stop()
            raise

    def start_server(self, port: int, replica_of: int | None = None) -> None:
        """Start (or start again, on its files) the data server on ``port``."""
        folder = self.workdir / f"redis-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(folder)]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.procs[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
        client = redis.Redis(port=port)
        _wait_for(f"redis-server on {port} did not start", lambda: bool(client.ping()), 20)

    def _start_sentinel(self, port: int, down_after_ms: int) -> None:
        conf = self.workdir / f"sentinel-{port}.conf"  # a Sentinel rewrites its own file
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
            f"sentinel monitor {self.master} 127.0.0.1 {self.data[0]} 2\n"
            f"sentinel down-after-milliseconds {self.master} {down_after_ms}\n"
            f"sentinel failover-timeout {self.master} 10000\n"
            f"sentinel parallel-syncs {self.master} 1\n"
        )
        self.procs[port] = subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)

    def master_port(self) -> int | None:
        """The master's port as the Sentinels name it now (the first that answers)."""
        for port in self.sentinels:
            with contextlib.suppress(redis.RedisError):
                found = _master_addr(redis.Redis(port=port, socket_timeout=1), self.master)
                if found:
                    return found
        return None

    def wait_ready(self, master: int, timeout: float = 60) -> None:
        """Until every Sentinel names ``master`` and knows its replica, and the replica's
        link to it is up: a failover can then happen."""
        def ready() -> bool:
            for port in self.sentinels:
                s = redis.Redis(port=port, socket_timeout=1)
                if _master_addr(s, self.master) != master:
                    return False
                info: Any = s.sentinel_master(self.master)
                if int(info.get("num-slaves", 0)) < 1:
                    return False
                if int(info.get("num-other-sentinels", 0)) < 2:
                    return False
            replica = next(p for p in self.data if p != master)
            repl = redis.Redis(port=replica, socket_timeout=1).info("replication")
            return bool(repl.get("master_link_status") == "up"
                        and int(repl.get("master_port", 0)) == master)

        _wait_for("the Sentinels did not agree on a master with a replica", ready, timeout)

    def kill(self, port: int) -> None:
        """SIGKILL the server on ``port``: a crash, no goodbye."""
        self.procs[port].kill()
        self.procs[port].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


class Worker:
    """One `celery -A pfbuild.worker worker` process group."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        logdir: Path,
        concurrency: int = 1,
        pool: str = "prefork",
        python: str = sys.executable,
    ) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self._log_file = open(self.log, "wb")  # noqa: SIM115 (lives as long as the worker)
        self.proc = subprocess.Popen(
            [
                python,  # another install's pfbuild, to compare two versions
                "-m",
                "celery",
                "-A",
                "pfbuild.worker",
                "worker",
                f"--hostname={name}@%h",
                f"--concurrency={concurrency}",
                f"--pool={pool}",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            env={**os.environ, **env},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a kill takes the pool too
        )

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"ready." in self.log.read_bytes():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"worker {self.name} not ready:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole worker: main process and pool children, no goodbyes."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log_file.close()

    def stop(self) -> None:
        self._log_file.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def drop_image(engine: Engine, image_tag: str) -> None:
    """Take an answer's image out of ``engine``: its code tag and its profile's
    ``:latest`` (the image goes once no tag names it)."""
    engine.remove(image_tag)
    engine.remove(image_tag.rpartition(":")[0] + ":latest")
