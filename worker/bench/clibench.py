"""``pfbuild bench cli``: a cache hit through the command line, against the references
issue 15 names, each a fresh process, in alternating rounds of one run:

- the embedded default (``pfbuild submit --wait``, no ``PFBUILD_REDIS_URL``) and
  ``pfbuild build``, against :mod:`pfbuild.worker.bench.docker_hit` (the docker SDK
  imported, the request read, ``images.get``);
- ``pfbuild submit --wait`` against a farm (a redis-server and a celery worker of the
  bench's own), against ``python -c 'import json'`` (the interpreter's start-up).

A repeated hit of one checkout is answered before the command line loads
(``client/quickhit.py``); each command is also timed the whole way
(``PFBUILD_CLIENT_HITS=false``), as a checkout's first call goes, beside it. Every answer
is checked to be the built image, from the engine's cache.

Every process is timed from spawn to exit (wall) and by the CPU it used (user + system):
on a loaded machine the CPU figure moves less. Each round runs every command once, in an
order rotated from round to round; the ratios are of the medians. pfbuild's own modules
are byte-compiled first, as ``pip install`` does: an editable install under
``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile them in every process, and the
figure would measure that flag rather than pfbuild.
"""

from __future__ import annotations

import compileall
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pfbuild.client.settings import Settings
from pfbuild.worker.bench import docker_hit
from pfbuild.worker.bench.localfarm import RedisServer, Worker
from pfbuild.worker.layout import EXCLUDED_FROM_CONTEXT

__all__ = ["cli_bench"]

Row = dict[str, Any]

JSON = "python -c 'import json'"
SCRIPT = "docker SDK script"
# measure -> (its baseline, the goal its ratio must meet)
GOALS = {
    "embedded submit --wait": (SCRIPT, 1.5),
    "pfbuild build": (SCRIPT, 1.5),
    "farm submit --wait": (JSON, 4.0),
}
# the same commands the whole way (PFBUILD_CLIENT_HITS=false: no remembered hit, as a
# checkout's first call pays): shown beside, with no goal
WHOLE = " (whole way)"



@dataclass
class _Command:
    argv: list[str]
    env: dict[str, str]
    stdin: bytes = b""
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def run(self) -> bytes:
        """Run once, recording its wall and CPU seconds; its stdout (it must succeed)."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(self.argv, env=self.env, input=self.stdin, capture_output=True)
        self.wall.append(time.perf_counter() - start)
        # only this child was reaped meanwhile: the farm's processes live until the end
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu.append(
            after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{self.argv} failed ({proc.returncode}): {proc.stdout[-2000:]!r} "
                f"{proc.stderr[-2000:]!r}"
            )
        return proc.stdout


def _pfbuild() -> list[str]:
    """The ``pfbuild`` console script next to this interpreter, as agents run it."""
    script = Path(sys.executable).with_name("pfbuild")
    found = str(script) if script.exists() else shutil.which("pfbuild")
    if found is None:
        return [sys.executable, "-c", "import sys; from pfbuild.client.main import main; "
                "sys.exit(main())"]
    return [found]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@contextmanager
def _workspace(repo: Path) -> Iterator[tuple[Path, bytes, str]]:
    """A copy of ``repo`` with a profile of the bench's own (its id a nonce, so no other
    run's image answers); yields the folder, the request, and the profile's tag."""
    with tempfile.TemporaryDirectory(prefix="pfbuild-clibench-") as tmp:
        work = Path(tmp)
        copy = work / "repo"
        shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(*EXCLUDED_FROM_CONTEXT))
        profile = json.loads((repo / "repo_profile.json").read_text())
        profile_id = f"pfbench-cli-{uuid.uuid4().hex[:12]}"
        (copy / "bench_profile.json").write_text(
            json.dumps({"profile_id": profile_id, "profile": profile})
        )
        request = {"repo_dir": str(copy), "profile_path": str(copy / "bench_profile.json")}
        yield work, json.dumps(request).encode(), f"patchfoundry/{profile_id}:latest"


def _commands(env: dict[str, str], farm_url: str, request: bytes) -> dict[str, _Command]:
    pfbuild = _pfbuild()
    embedded = {k: v for k, v in env.items() if k != "PFBUILD_REDIS_URL"}
    commands = {
        JSON: _Command([sys.executable, "-c", "import json"], env),
        SCRIPT: _Command([sys.executable, docker_hit.__file__], env, request),
        "embedded submit --wait": _Command([*pfbuild, "submit", "--wait", "--json"],
                                           embedded, request),
        "pfbuild build": _Command([*pfbuild, "build"], embedded, request),
        "farm submit --wait": _Command([*pfbuild, "submit", "--wait", "--json"],
                                       {**embedded, "PFBUILD_REDIS_URL": farm_url}, request),
    }
    for name in GOALS:
        quick = commands[name]
        commands[name + WHOLE] = _Command(
            quick.argv, {**quick.env, "PFBUILD_CLIENT_HITS": "false"}, quick.stdin
        )
    return commands


def _check_hit(name: str, out: bytes, image_id: str) -> None:
    """Every command must answer the same image, from the engine's cache."""
    answer = json.loads(out)
    if answer.get("image_id") != image_id or answer.get("cache_source", "local") != "local":
        raise RuntimeError(f"{name} did not answer the cached image: {answer}")


def _rows(commands: dict[str, _Command]) -> list[Row]:
    rows: list[Row] = []
    measures: list[tuple[str, str, float | None]] = [(n, b, g) for n, (b, g) in GOALS.items()]
    measures += [(n + WHOLE, b, None) for n, (b, _) in GOALS.items()]
    for name, baseline, goal in measures:
        ours, base = commands[name], commands[baseline]
        wall, cpu = _median(ours.wall), _median(ours.cpu)
        base_wall, base_cpu = _median(base.wall), _median(base.cpu)
        rows.append({
            "measure": name, "baseline": baseline,
            "wall_s": wall, "baseline_wall_s": base_wall, "ratio_wall": wall / base_wall,
            "cpu_s": cpu, "baseline_cpu_s": base_cpu, "ratio_cpu": cpu / base_cpu,
            "goal": f"<= {goal}x" if goal else "-",
            "met": wall / base_wall <= goal if goal else "-",
        })
    return rows


def cli_bench(settings: Settings, repo: Path, rounds: int = 20) -> list[Row]:
    """Build the profile once (through ``pfbuild build``), start a farm, then time every
    command's hit in ``rounds`` alternating rounds; the rows of :data:`GOALS`."""
    import pfbuild.client

    worker_dir = Path(__file__).resolve().parent.parent
    for folder in (Path(str(pfbuild.client.__file__)).parent, worker_dir):
        compileall.compile_dir(str(folder), quiet=1)
    env = {k: v for k, v in os.environ.items() if k != "PFBUILD_REDIS_URL"}
    with _workspace(repo) as (work, request, tag):
        env["PFBUILD_TMP_DIR"] = str(work / "pf-tmp")
        server = RedisServer(work)
        worker = Worker("clibench", {**env, "PFBUILD_REDIS_URL": server.url}, work, 2)
        try:
            commands = _commands(env, server.url, request)
            built = json.loads(commands["pfbuild build"].run())
            worker.wait_ready()
            for name, command in commands.items():  # a warm-up round, checked
                out = command.run()
                if name != JSON:
                    _check_hit(name, out, built["image_id"])
            for command in commands.values():
                command.wall.clear()
                command.cpu.clear()
            order = list(commands.items())
            for i in range(rounds):
                for name, command in order[i % len(order):] + order[:i % len(order)]:
                    out = command.run()
                    if name not in (JSON, SCRIPT):
                        _check_hit(name, out, built["image_id"])
            return _rows(commands)
        finally:
            worker.stop()
            server.stop()
            from pfbuild.worker.engine import engine_from_settings

            engine_from_settings(settings).remove(tag)
