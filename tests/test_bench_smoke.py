"""The benchmark's smoke run, as CI runs it: every path measured and every ratio written. Not a timed test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the benchmark starts its own redis-server")
def test_bench_smoke_measures_every_path_and_writes_the_ratios(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    tiny = data["models"]["tiny"]
    for key in "abcdef":
        path = tiny["paths"][key]
        assert path["images_per_s"] > 0, key
        assert path["batch_size"] >= 1 and path["dtype"] and path["mean_tokens"] > 0, key
    # The smoke run's fast profile leaves compile out (minutes on a small CPU): sdpa and draft are what run.
    assert tiny["paths"]["a"]["profile"] == "exact"
    assert tiny["paths"]["e"]["profile"] == tiny["paths"]["f"]["profile"] == "fast:sdpa,draft"
    assert {r["ratio"] for r in tiny["ratios"]} == {"b/a", "b/c", "b/d", "f/d", "f/b", "e/a"}
    assert all(r["value"] > 0 and r["verdict"] in ("PASS", "FAIL", "-") for r in tiny["ratios"])
    assert {r["ratio"]: r["verdict"] for r in tiny["ratios"]}["f/d"] in ("PASS", "FAIL")
    assert set(tiny["captions"]) >= {"a_vs_b", "a_vs_c", "a_vs_d", "a_vs_e", "a_vs_f"}
    latency = tiny["latency"]
    assert latency["calls"] == 5 and latency["worker_p50_ms"] > 0 and latency["verdict"] in ("PASS", "FAIL")
    assert latency["p50_ms"] >= latency["worker_p50_ms"]  # the call includes the worker's own time
    checks = data["producer"]["checks"]
    assert len(checks) == 4 and all(c["value"] > 0 and c["verdict"] in ("PASS", "FAIL") for c in checks)
    assert (out / "bench.md").read_text(encoding="utf-8").count("| b/") == 3
    assert (out / data["chart"]).is_file()
