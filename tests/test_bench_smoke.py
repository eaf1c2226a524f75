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


def test_gpu_bench_refuses_a_cpu_machine_and_writes_its_readme_section(tmp_path: Path) -> None:
    """bench/gpu.sh's measurement needs CUDA (it says so and exits 2 here); its results land between the README's
    GPU markers, replacing what was there and nothing else."""
    import torch

    from bench import gpu

    if not torch.cuda.is_available():
        proc = subprocess.run(
            [sys.executable, "-m", "bench.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    readme = tmp_path / "README.md"
    original = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    readme.write_text(original, encoding="utf-8")
    row = {
        "batch": 8,
        "images_per_s": 900.0,
        "ms_per_batch": 8.9,
        "encoder_ms": 3.0,
        "prefill_ms": 2.0,
        "decode_ms": 3.9,
        "peak_memory_gib": 1.2,
    }
    e2e = {
        "profile": "exact",
        "images": 64,
        "images_per_s": 700.0,
        "mean_batch": 32.0,
        "stages_ms_per_image": {"generate": 1.1},
        "cpu_ms_per_image": 9.0,
        "oom_halvings": [],
        "captioned": 64,
    }
    data = {
        "meta": {
            "device": "GPU X",
            "date": "today",
            "command": "bench/gpu.sh",
            "code": "abc",
            "seconds": 400.0,
            "max_length": 20,
        },
        "inprocess": [{"profile": "exact", "fallbacks": {}, "warm_up_s": 0.0, "rows": [row]}],
        "end_to_end": [e2e],
        "oom": {**e2e, "oom_halvings": [(2048, 1024)], "fraction": 0.04, "batch": 2048},
    }
    gpu.into_readme(readme, gpu.markdown(data))
    written = readme.read_text(encoding="utf-8")
    assert "### GPU: GPU X" in written and "| 8 | 900.0 | 8.9 | 3.0 | 2.0 | 3.9 | 1.2 |" in written
    assert "halvings 2048 -> 1024; 64/64 captioned" in written
    start, end = original.index(gpu.README_START), original.index(gpu.README_END)
    assert written.startswith(original[: start + len(gpu.README_START)])
    assert written.endswith(original[end:]) and "Not measured yet" not in written


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="the benchmarks start their own redis-server")
@pytest.mark.parametrize(
    ("module", "args", "expect"),
    [
        ("bench.review_paging", ["--large", "2000", "--small", "400", "--repeats", "1"], "| unfiltered |"),
        ("bench.ledger_size", ["--items", "300", "--backend", "redis"], '"redis_bytes_per_captioned_item"'),
        ("bench.families", ["--families", "llava", "--images", "2", "--rounds", "1", "--end-to-end"], "| llava |"),
        ("bench.load_time", ["--model", "tiny", "--rounds", "1"], "from start to ready"),
    ],
)
def test_standalone_benchmarks_still_run_at_a_small_size(module: str, args: list[str], expect: str) -> None:
    """The benchmarks outside bench.run are run by hand, rarely: at a small size here, so a change of the code they
    measure cannot leave them broken unnoticed (the review paging one was, after the ledger became a package)."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout, proc.stdout[-2000:]
