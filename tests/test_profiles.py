"""Speed profiles end to end: names checked at start-up, pieces that cannot run falling back with their reason,
and the pieces in use reported in every result row, `captioner_info`, `captioner doctor` and the metrics."""

from __future__ import annotations

import json
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from common.errors import ConfigError
from model import profiles
from producer.jobs import JobClient, workers_info
from producer.local import LocalRedis, WorkerProcess, free_port
from tests.conftest import settings_from


def test_pieces_and_profiles_parse_and_print_in_one_order() -> None:
    assert profiles.parse_adjustments(" +SDPA, -int8 compile,") == {"sdpa": True, "int8": False, "compile": True}
    assert profiles.parse_adjustments("+sdpa,-sdpa") == {"sdpa": False}  # the later entry wins
    assert profiles.requested("exact", "", "cpu") == ()
    assert profiles.requested("fast", "", "cpu") == profiles.FAST_PIECES["cpu"]
    assert profiles.requested("FAST", "-draft,+cudagraphs", "cpu", extra=["int8"])[-2:] == ("int8", "cudagraphs")
    assert profiles.provenance(["draft", "sdpa"]) == "fast:sdpa,draft" and profiles.provenance([]) == "exact"
    assert profiles.pieces_of("fast:sdpa,draft") == ("sdpa", "draft") and profiles.pieces_of("exact") == ()
    with pytest.raises(ConfigError, match="unknown speed piece 'flash'"):
        profiles.parse_adjustments("+sdpa,+flash")
    with pytest.raises(ConfigError, match="unknown speed profile 'turbo'"):
        profiles.requested("turbo", "", "cpu")


def test_a_dropped_piece_is_logged_once_and_never_comes_back(caplog: pytest.LogCaptureFixture) -> None:
    pieces = profiles.Pieces.asked(["draft", "compile", "sdpa"])
    assert pieces.provenance == "fast:sdpa,compile,draft"
    pieces.drop("compile", "no C++ compiler")
    pieces.drop("compile", "again")
    pieces.drop("int8", "never asked for")
    assert pieces.as_dict() == {
        "profile": "fast:sdpa,draft",
        "pieces": ["sdpa", "draft"],
        "fallbacks": {"compile": "no C++ compiler"},
    }
    assert caplog.text.count("speed piece compile is off: no C++ compiler") == 1 and "int8" not in caplog.text


def test_unknown_piece_or_profile_stops_the_worker_command_in_one_line(worker_env: dict[str, str]) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["worker", "--pieces", "+sdpa,+warp"], env=worker_env, catch_exceptions=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "error: unknown speed piece 'warp' in '+sdpa,+warp': use sdpa, compile, int8, cudagraphs, draft "
        "(+name or -name)"
    ]
    result = runner.invoke(cli, ["worker"], env={**worker_env, "CAPTIONER_PROFILE": "turbo"}, catch_exceptions=False)
    assert (
        result.exit_code == 1
        and result.output.startswith("error: bad setting profile")
        and "Traceback" not in (result.output)
    )
    result = runner.invoke(cli, ["worker", "--profile", "turbo"], env=worker_env, catch_exceptions=False)
    assert result.exit_code == 2 and "'turbo' is not one of 'exact', 'fast'" in result.output


def test_plain_celery_worker_with_an_unknown_piece_refuses_to_start(worker_env: dict[str, str], tmp_path: Path) -> None:
    """Started without our CLI, the worker checks the pieces where it loads the model, and exits with one line."""
    with LocalRedis() as server:
        env = {
            **worker_env,
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_RESULT_BACKEND": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(1),
            "CAPTIONER_PIECES": "+turbo",
        }
        argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO"]
        proc = WorkerProcess(env, argv=argv, log=tmp_path / "celery.log").start()
        assert proc.proc is not None
        code = proc.proc.wait(timeout=180)
        proc.terminate()
    log = proc.log_path.read_text()
    assert code != 0 and " ready." not in log
    assert "unknown speed piece 'turbo' in '+turbo'" in log and "Traceback" not in log


def test_pieces_in_use_reach_rows_info_doctor_and_metrics(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    """fast on a CPU (sdpa and draft), compile switched off (as on a CPU's fast already) and cudagraphs on:
    cudagraphs cannot run without CUDA, so it falls back with its reason and the rows say what really ran."""
    from training.synthetic import make_shapes

    refs = [
        str(p) for p, _ in make_shapes(session_root / f"prof-{uuid.uuid4().hex[:6]}", 4, seed=8, size=96, fmt="jpeg")
    ]
    port = free_port()
    with LocalRedis(appendonly=True) as server:
        env = {
            **worker_env,
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_RESULT_BACKEND": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(1),
            "CAPTIONER_PROFILE": "fast",
            "CAPTIONER_METRICS_PORT": str(port),
            "CAPTIONER_METRICS_ADDR": "127.0.0.1",
        }
        with WorkerProcess(env, log=tmp_path / "w.log", extra_args=["--pieces", "-compile,+cudagraphs"]) as proc:
            proc.wait_ready()
            client = JobClient(settings_from(env))
            client.enqueue(refs, job_id="job-profile")
            client.wait("job-profile", timeout=60, on_tick=lambda _: None)
            rows = list(client.results("job-profile"))
            info = workers_info(client.app)[proc.name]
            client.close()
            doctor = CliRunner().invoke(cli, ["doctor", "--json"], env=env, catch_exceptions=False)
            page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert [r["status"] for r in rows] == ["ok"] * 4 and {r["profile"] for r in rows} == {"fast:sdpa,draft"}
    assert info["profile"] == "fast:sdpa,draft" and info["pieces"] == ["sdpa", "draft"]
    assert info["fallbacks"] == {"cudagraphs": "CUDA graphs need a CUDA device; this model runs on cpu"}
    assert info["warm_up_s"] == 0.0  # nothing left to compile or capture
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert f"{proc.name}: tiny-git@" in checks["caption workers"]["detail"]
    assert "(fast:sdpa,draft)" in checks["caption workers"]["detail"]
    assert (
        checks["speed pieces"]["level"] == "warn"
        and "cudagraphs off (CUDA graphs need" in checks["speed pieces"]["detail"]
    )
    assert 'captioner_speed_profile_info{profile="fast:sdpa,draft"} 1.0' in page
    assert "speed piece cudagraphs is off: CUDA graphs need a CUDA device" in proc.log_path.read_text()
