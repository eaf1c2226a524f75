"""The README's main-job command, `captioner demo`, runs end to end at a size that keeps CI fast, on a broker URL
where nothing answers, so it also starts (and must stop again) a throwaway redis-server of its own."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from producer.local import free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(900)
def test_demo_fine_tunes_through_the_queue_and_captions_held_out_images(tmp_path: Path) -> None:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("redis-server is not installed (make setup installs it)")
    nobody = f"redis://127.0.0.1:{free_port()}/0"  # a free port: no Redis answers there
    path = os.pathsep.join([str(Path(sys.executable).parent), str(Path(redis_server).parent)])
    env = {"CAPTIONER_BROKER_URL": nobody, "PATH": path, "HOME": "/tmp"}
    argv = [
        sys.executable,
        "-m",
        "cli.main",
        "demo",
        "--json",
        "--steps",
        "300",
        "--train-images",
        "400",
        "--images",
        "6",
        "--workdir",
        str(tmp_path / "demo"),
    ]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    # Measured on 2 busy CPU cores (the 100 held-out images of the demo): the untrained GIT scores WER ~1.4
    # (random words up to max_length, longer than the references); 300 steps at batch 32 bring it to
    # about 0.25 (template and colours right, shape and position not yet). 0.5 leaves room for a slow,
    # noisy machine while still failing a run that did not learn.
    assert summary["wer_before"] > 0.9
    assert summary["wer_after"] < 0.5
    assert summary["job"]["ok"] == 6 and len(summary["results"]) == 6
    assert all(r["caption"] and r["model_version"] == summary["model_version"] for r in summary["results"])
    assert (tmp_path / "demo" / "captions.jsonl").read_text().count("\n") == 6
    assert "background" in " ".join(r["caption"] for r in summary["results"])  # it learned the template
    # It started a redis-server and two workers, and stopped all three.
    started = summary["started"]
    assert started["redis_server_port"] and len(started["worker_pids"]) == 2
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", started["redis_server_port"]), timeout=1).close()
    assert not [pid for pid in started["worker_pids"] if _alive(pid)]


def test_the_demo_model_with_gits_own_tokenizer(tmp_path: Path) -> None:
    """`captioner demo --vocab bert`: the same small GIT with bert-base-uncased's 30522 words, loadable as usual."""
    from cli.demo import _demo_model
    from model.engine import CaptionEngine, EngineConfig

    engine = CaptionEngine.load(EngineConfig(model=str(_demo_model(tmp_path / "m", "bert")), dtype="float32"))
    assert engine.model.config.vocab_size == 30522 and len(engine.processor.tokenizer) == 30522
    words = CaptionEngine.load(EngineConfig(model=str(_demo_model(tmp_path / "w", "words")), dtype="float32"))
    assert words.model.config.vocab_size < 100
