"""Real services started on this machine: a ``redis-server`` and ``celery worker``
processes. The integration tests and the benchmarks run the farm on these, so that
what they measure is the real broker and real worker processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

__all__ = ["RedisServer", "Worker", "free_port"]


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
