"""`pfbuild bench` prints what it measured: JSON with --json, a table otherwise (the
cheapest bench, the context digest, stands for the command's shared reporting)."""

from __future__ import annotations

import json
import subprocess
import sys


def _bench(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pfbuild.client.main", "bench", "digest", "--megabytes", "1",
         "--files", "10", *args],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_bench_prints_json_or_a_table() -> None:
    out = json.loads(_bench("--json"))
    assert out["benchmark"] == "digest"
    (row,) = out["rows"]
    assert row["cold_s"] > 0 and row["warm_ms_per_mb"] >= 0
    table = _bench()
    assert "context digest" in table and "cold_ms_per_mb" in table
