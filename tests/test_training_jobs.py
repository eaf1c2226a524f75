"""Training jobs end once, whatever happens: the lock (atomic, heartbeat that survives Redis errors and notices a
takeover), orphans (crashed or never started, but never failed or still queued), a failing job that ends
FAILED once, a refused promotion that ends DONE, and what the CLI and the metrics endpoint show of it all.
Real Redis servers, a real training worker, the CLI through click's runner."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from cli.main import cli
from common.connections import redis_client
from common.errors import ConfigError
from common.messages import TASK_EVALUATE, TASK_TRAIN, JobState, TrainOutcome, TrainRequest
from common.store import ModelStore
from ledger import RedisLedger
from producer.jobs import JobClient
from producer.local import LocalRedis, WorkerProcess, free_port
from tests.conftest import settings_from
from tests.test_recovery import wait_for
from training.jobs import _Heartbeat, open_train_job, orphaned_train_jobs, run_train

TTL_S = 3  # the smallest lock lifetime settings allow: orphan scans every 1.5 s, unstarted grace 6 s


@pytest.fixture(scope="module")
def server() -> Iterator[LocalRedis]:
    with LocalRedis() as local:
        yield local


@pytest.fixture
def ledger(server: LocalRedis) -> Iterator[RedisLedger]:
    led = RedisLedger(redis_client(server.url(1)), f"t-{uuid.uuid4().hex[:6]}")
    yield led
    led.r.close()


def _cli(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(cli, list(args), env=env)


# --- the lock ------------------------------------------------------------------------------------------


def test_try_lock_is_one_owner_at_a_time(ledger: RedisLedger) -> None:
    assert ledger.try_lock("j", "a", 30) and ledger.try_lock("j", "a", 30)  # take, then refresh
    assert not ledger.try_lock("j", "b", 30)
    ledger.unlock("j", "b")  # not b's to release
    assert ledger.locked("j")
    ledger.unlock("j", "a")
    assert not ledger.locked("j") and ledger.try_lock("j", "b", 30)
    assert 0 < ledger.r.ttl(f"{ledger.prefix}:job:j:lock") <= 30


def test_heartbeat_notices_another_owner_and_leaves_its_lock(ledger: RedisLedger) -> None:
    beat = _Heartbeat(ledger, "j", ttl_s=30)
    assert beat.acquire() and not beat.lost()
    ledger.r.set(f"{ledger.prefix}:job:j:lock", "intruder")  # our lock lapsed and another runner took the job
    beat.beat_once()
    assert beat.lost()
    beat.release()
    assert ledger.r.get(f"{ledger.prefix}:job:j:lock") == b"intruder"


def test_heartbeat_survives_redis_errors_then_gives_up_after_its_ttl(caplog: pytest.LogCaptureFixture) -> None:
    with LocalRedis() as own:
        led = RedisLedger(redis_client(own.url(0)), "hb")
        beat = _Heartbeat(led, "j", ttl_s=1)
        assert beat.acquire()
        own.kill()
        with caplog.at_level(logging.WARNING, logger="training.jobs"):
            beat.beat_once()  # logged, not raised
            assert not beat.cancelled()  # a read that fails is not a cancel
        assert not beat.lost(), "within its TTL the lock may still be ours"
        assert beat._thread.is_alive(), "the heartbeat thread keeps trying"
        assert "could not refresh the training lock" in caplog.text
        wait_for(beat.lost, 30, "the heartbeat to give up: no refresh for a whole TTL, another worker may resume")
        beat.release()  # does not raise with Redis gone


def test_a_runner_whose_lock_is_taken_stops_without_a_version(
    ledger: RedisLedger, worker_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    from training.synthetic import make_shapes
    from training.tiny import build_tiny_git

    data = session_root / f"lost-{uuid.uuid4().hex[:6]}"
    make_shapes(data, 24, seed=8, size=32)
    base = build_tiny_git(tmp_path / "base", seed=0)
    settings = settings_from(
        {
            **worker_env,
            "CAPTIONER_MODEL_STORE": str(tmp_path / "store"),
            "CAPTIONER_TRAIN_LOCK_TTL_S": str(TTL_S),
            "CAPTIONER_TORCH_THREADS": "1",
        }
    )
    config = {
        "base_model": str(base),
        "max_steps": 5000,
        "eval_steps": 1000,
        "save_steps": 1000,
        "batch_size": 4,
        "log_steps": 1,
        "max_length": 8,
    }
    req = TrainRequest(job_id="train-lost", dataset=str(data), config=config)
    open_train_job(ledger, req)
    key = f"{ledger.prefix}:job:train-lost:lock"

    def intrude() -> None:
        deadline = time.monotonic() + 60
        while (ledger.get_field("train-lost", "progress") or {}).get("step", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        ledger.r.set(key, "another-runner")

    thief = threading.Thread(target=intrude, daemon=True)
    thief.start()
    summary = run_train(settings, ledger, req)
    thief.join()
    assert summary["status"] == TrainOutcome.LOST_LOCK
    assert 3 <= summary["steps"] < 5000, "it stopped at a step after the takeover, not at the end"
    assert ledger.state("train-lost") is JobState.RUNNING and ledger.get_field("train-lost", "result") is None
    assert not ModelStore(tmp_path / "store").list()
    assert ledger.r.get(key) == b"another-runner"


# --- orphans ------------------------------------------------------------------------------------------


def test_orphans_are_crashed_or_never_started_jobs_only(ledger: RedisLedger) -> None:
    req = TrainRequest(job_id="train-o", dataset="/data/set", config={})
    open_train_job(ledger, req)  # recorded, and (say) its message was never sent
    assert orphaned_train_jobs(ledger, grace_s=60) == [], "within its grace an unstarted job is on its way"
    assert orphaned_train_jobs(ledger, grace_s=0) == [req]
    assert orphaned_train_jobs(ledger, grace_s=0, waiting=lambda ids: set(ids)) == [], "its message still waits"
    ledger.set_fields("train-o", started=time.time() + 1)  # a runner took it...
    ledger.try_lock("train-o", "runner", 30)
    assert orphaned_train_jobs(ledger, grace_s=0) == [], "...and holds the lock"
    ledger.unlock("train-o", "runner")  # ...and died: the lock lapsed
    assert orphaned_train_jobs(ledger, grace_s=60) == [req], "a crash resumes at once"
    ledger.set_fields("train-o", sent=time.time() + 2)  # re-sent after the crash
    assert orphaned_train_jobs(ledger, grace_s=60) == [], "once re-sent, that message gets its grace too"
    for state in (JobState.FAILED, JobState.DONE, JobState.CANCELLED):
        ledger.set_state("train-o", state)
        assert orphaned_train_jobs(ledger, grace_s=0) == [], f"a {state} job never comes back"


# --- the CLI before anything runs -----------------------------------------------------------------------


@pytest.fixture
def cli_env(server: LocalRedis, tmp_path: Path) -> dict[str, str]:
    return {
        "CAPTIONER_BROKER_URL": server.url(0),
        "CAPTIONER_REDIS_URL": server.url(1),
        "CAPTIONER_KEY_PREFIX": f"t-{uuid.uuid4().hex[:6]}",
        "CAPTIONER_MODEL_STORE": str(tmp_path / "store"),
        "CAPTIONER_TRAINING_QUEUE": f"nobody-{uuid.uuid4().hex[:6]}",
    }


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--eval-steps", "30"], "save_steps (50) to be a multiple of eval_steps (30)"),
        (["--set", "grad_accum=two"], "grad_accum must be an integer"),
        (["--set", "no_such=1"], "no such training option"),
        (["--set", "seed=1", "--set", "seed=2"], "given twice"),
        (["--require-no-worse", "wer"], "only applies with promote"),
        (["--promote", "--require-no-worse", "speed"], "must name a metric"),
    ],
)
def test_a_bad_training_config_is_one_line_and_sends_nothing(
    cli_env: dict[str, str], tmp_path: Path, args: list[str], said: str
) -> None:
    out = _cli(cli_env, "train", str(tmp_path), *args)
    assert out.exit_code == 1 and said in out.stderr, out.output
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.output
    assert json.loads(_cli(cli_env, "jobs", "--json").stdout) == []
    assert redis_client(cli_env["CAPTIONER_BROKER_URL"]).llen(cli_env["CAPTIONER_TRAINING_QUEUE"]) == 0


def test_status_shows_missing_numbers_as_dashes(cli_env: dict[str, str]) -> None:
    client = JobClient(settings_from(cli_env))
    open_train_job(client.ledger, TrainRequest(job_id="train-new", dataset="/d", config={}))
    client.ledger.set_fields(
        "train-new", progress={"step": 0, "total_steps": 10, "loss": None, "eta_s": None, "epoch": 0.0, "metrics": None}
    )
    client.close()
    out = _cli(cli_env, "status", "train-new")
    assert out.exit_code == 0, out.output
    assert "0/10  epoch 0.00  loss -  eta -s" in out.stdout and "tensorboard" not in out.stdout
    client = JobClient(settings_from(cli_env))
    client.ledger.set_fields("train-new", progress={"step": 1, "total_steps": 10, "tensorboard": "/runs/x/tensorboard"})
    client.close()
    assert "tensorboard /runs/x/tensorboard" in _cli(cli_env, "status", "train-new").stdout


@pytest.mark.parametrize("store", ["unset", "under a file"])
def test_a_training_worker_that_cannot_store_versions_does_not_start(
    cli_env: dict[str, str], tmp_path: Path, store: str
) -> None:
    """`captioner worker --training` says what is missing in one line and exits 1, before it consumes anything
    (a job it took would fail, or come back every few minutes)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")} | cli_env
    if store == "unset":
        del env["CAPTIONER_MODEL_STORE"]
    else:
        (tmp_path / "a-file").write_text("x")
        env["CAPTIONER_MODEL_STORE"] = str(tmp_path / "a-file" / "store")
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "worker", "--training"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "CAPTIONER_MODEL_STORE" in line and "Traceback" not in proc.stderr
    assert ("writable" in line and "a-file" in line) if store == "under a file" else "set it" in line
    assert redis_client(cli_env["CAPTIONER_BROKER_URL"]).llen(cli_env["CAPTIONER_TRAINING_QUEUE"]) == 0


def test_a_plain_celery_training_worker_without_a_store_exits_at_start(cli_env: dict[str, str]) -> None:
    """The same check through `celery -A training.celery_app worker`: a critical line, and the worker exits."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")} | cli_env
    del env["CAPTIONER_MODEL_STORE"]
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "training.celery_app",
        "worker",
        "--pool=threads",
        f"--queues={cli_env['CAPTIONER_TRAINING_QUEUE']}",
        "--without-mingle",
        "--without-gossip",
    ]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    critical = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "CRITICAL" in ln]
    assert len(critical) == 1 and "CAPTIONER_MODEL_STORE" in critical[0], proc.stdout + proc.stderr


def test_promote_lets_a_version_no_worse_through_the_gate(cli_env: dict[str, str], tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    old = store.add(model, {"metrics": {"wer": 0.30}, "eval_fingerprint": "fp"}, "old")
    store.promote(old.version)
    store.add(model, {"metrics": {"wer": 0.30}, "eval_fingerprint": "fp"}, "same")
    store.add(model, {"metrics": {"wer": 0.31}, "eval_fingerprint": "fp"}, "worse")
    better = _cli(cli_env, "promote", "same", "--require-no-worse", "wer")  # equal is no worse
    assert better.exit_code == 0 and "promoted same" in better.stdout, better.output
    assert store.current().version == "same"
    refused = _cli(cli_env, "promote", "worse", "--require-no-worse", "wer")
    assert refused.exit_code == 1 and "worse than same on wer" in refused.stderr
    assert store.current().version == "same"


def test_evaluate_without_a_training_worker_is_one_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    out = _cli(cli_env, "evaluate", "current", str(tmp_path))
    assert out.exit_code == 1 and "no training worker answers" in out.stderr and "Traceback" not in out.output


# --- through a real training worker -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(
    server: LocalRedis, worker_env: dict[str, str], session_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One training worker; job A trains (and its promotion is refused), job F (bad dataset) waits behind it
    past the orphan grace, then fails. Statuses and metrics are read while A runs."""
    from training.data import dataset_fingerprint, load_examples, split_examples
    from training.synthetic import make_shapes
    from training.tiny import build_tiny_git

    tmp = tmp_path_factory.mktemp("train-jobs")
    store = ModelStore(tmp / "store")
    data = session_root / f"jobs-{uuid.uuid4().hex[:6]}"
    make_shapes(data, 48, seed=3, size=32)
    base = store.add(build_tiny_git(tmp / "base", seed=0), {"base_model": "tiny"}, "base")
    eval_fp = dataset_fingerprint(split_examples(load_examples(str(data)), 0.1, 42)[1])
    champion = store.add(base.path, {"metrics": {"wer": 0.0}, "eval_fingerprint": eval_fp}, "champion")
    store.promote(champion.version)
    port = free_port()
    env = {
        **worker_env,
        "CAPTIONER_BROKER_URL": server.url(2),
        "CAPTIONER_RESULT_BACKEND": server.url(2),
        "CAPTIONER_REDIS_URL": server.url(3),
        "CAPTIONER_MODEL_STORE": str(store.root),
        "CAPTIONER_TRAIN_LOCK_TTL_S": str(TTL_S),
        "CAPTIONER_METRICS_PORT": str(port),
        "CAPTIONER_METRICS_ADDR": "127.0.0.1",
    }
    out: dict[str, Any] = {"env": env, "store": store, "data": data, "statuses": [], "scrapes": []}
    scans = _scan_counter(port)
    with WorkerProcess(env, training=True, log=tmp / "train.log") as proc:
        proc.wait_ready()
        client = JobClient(settings_from(env))
        # H holds the worker until F has waited in the queue past its grace and the orphan scan has seen it there.
        hold = {
            "base_model": str(base.path),
            "max_steps": 1_000_000,
            "eval_steps": 1_000_000,
            "batch_size": 4,
            "save_steps": 1_000_000,
            "max_length": 8,
            "log_steps": 1,
        }
        client.submit_training(TrainRequest(job_id="train-h", dataset=str(data), config=hold))
        wait_for(lambda: (client.status("train-h").extra.get("progress") or {}).get("step", 0) >= 1, 120, "H to run")
        submit = _cli(
            env,
            "train",
            str(data),
            "--job-id",
            "train-a",
            "--base-model",
            str(base.path),
            "--max-steps",
            "200",
            "--eval-steps",
            "20",
            "--batch-size",
            "8",
            "--learning-rate",
            "3e-3",
            "--set",
            "save_steps=20",
            "--set",
            "grad_accum=1",
            "--set",
            "lr_scheduler=constant",
            "--set",
            "max_length=12",
            "--set",
            "eval_max_samples=8",
            "--set",
            "log_steps=5",
            "--promote",
            "--require-no-worse",
            "wer",
        )
        assert submit.exit_code == 0, submit.output
        client.submit_training(TrainRequest(job_id="train-f", dataset=str(tmp / "gone"), config={}))
        # Queued behind H, A and F: the user gives up after a second, and the evaluation is withdrawn.
        out["evaluate_late"] = _cli(env, "evaluate", "current", str(data), "--timeout", "1")
        # The withdrawn result no longer listens for an answer (the CLI's exception still holds it here).
        out["result_channels_after_late"] = redis.Redis.from_url(server.url(2)).pubsub_channels("celery-task-meta-*")
        f_sent = float(client.ledger.get_field("train-f", "sent"))
        wait_for(lambda: time.time() > f_sent + 2 * TTL_S, 60, "F's grace to pass")  # the orphan scan's grace
        seen = scans()
        wait_for(lambda: scans() >= seen + 2, 60, "two orphan scans after F's grace")
        out["f_state_after_scans"] = client.status("train-f").state
        out["f_started_after_scans"] = client.ledger.get_field("train-f", "started")
        client.cancel("train-h")
        while client.status("train-a").state is JobState.RUNNING:
            out["statuses"].append(json.loads(_cli(env, "status", "train-a", "--json").stdout))
            if (out["statuses"][-1].get("progress") or {}).get("metrics") and len(out["scrapes"]) < 3:
                out["scrapes"].append(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read())
            time.sleep(0.2)  # polling the job's state, not waiting for it
        out["wait_f"] = _cli(env, "wait", "train-f", "--timeout", "120")
        seen = scans()
        wait_for(lambda: scans() >= seen + 4, 60, "four orphan scans after F failed: four chances to re-send it")
        # A base model that does not load: the job ends failed with the reason, and train --wait says it.
        (tmp / "not-a-model").mkdir()
        out["bad_base"] = _cli(
            env, "train", str(data), "--job-id", "train-b", "--base-model", str(tmp / "not-a-model"), "--wait"
        )
        out["final_scrape"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        out["a"], out["f"], out["h"] = client.status("train-a"), client.status("train-f"), client.status("train-h")
        out["orphans"] = orphaned_train_jobs(client.ledger, grace_s=0)
        version = out["a"].extra["result"]["version"]
        out["evaluate"] = _cli(env, "evaluate", version, str(data), "--max-samples", "6", "--max-length", "12")
        client.close()
    out["log"] = proc.log_path.read_text()
    return out


def _scan_counter(port: int):
    """Reads the training worker's count of orphan scans from its metrics endpoint."""

    def read() -> float:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            return 0.0
        lines = [ln for ln in text.splitlines() if ln.startswith("captioner_train_orphan_scans_total ")]
        return float(lines[0].split()[1]) if lines else 0.0

    return read


def test_a_failing_job_ends_failed_once_and_wait_exits_1(run: dict[str, Any]) -> None:
    f, log = run["f"], run["log"]
    assert f.state is JobState.FAILED and "no such file or directory" in f.extra["result"]["error"]
    assert run["wait_f"].exit_code == 1 and "job train-f failed: " in run["wait_f"].stderr
    assert log.count("training job train-f failed") == 1 and "resuming training job train-f" not in log
    assert run["orphans"] == []


def test_a_job_waiting_behind_another_past_the_grace_is_not_sent_again(run: dict[str, Any]) -> None:
    # F sat in the queue past its grace while two orphan scans ran: they found its message and left it there.
    assert run["f_state_after_scans"] is JobState.RUNNING and not run["f_started_after_scans"]
    received = [line for line in run["log"].splitlines() if f"{TASK_TRAIN}[" in line and " received" in line]
    assert len(received) == 4  # H, A, F and B, each once
    assert "resuming training job" not in run["log"]
    assert run["h"].state is JobState.CANCELLED and run["h"].extra["result"]["status"] == TrainOutcome.CANCELLED


def test_a_base_model_that_does_not_load_fails_the_job_with_the_reason(run: dict[str, Any]) -> None:
    out = run["bad_base"]
    assert out.exit_code == 1 and "Traceback" not in out.output, out.output
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("error: job train-b failed: ") and "not-a-model" in line and "safetensors" in line, line


def test_a_refused_promotion_is_a_done_job_that_keeps_its_version(run: dict[str, Any]) -> None:
    a, store = run["a"], run["store"]
    result = a.extra["result"]
    assert a.state is JobState.DONE and result["promoted"] is False
    assert result["promotion"].startswith("not promoted: ") and "worse than champion on wer" in result["promotion"]
    assert store.current().version == "champion"
    assert [v.version for v in store.list() if v.meta.get("job_id") == "train-a"] == [result["version"]]


def test_status_json_shows_the_latest_evaluation_while_training(run: dict[str, Any]) -> None:
    progress = [s["progress"] for s in run["statuses"] if s.get("progress")]
    # A loss report after an evaluation still carries it: the eval metrics are never overwritten by None.
    after_eval = [p for p in progress if p["kind"] == "train" and p.get("metrics")]
    assert after_eval, [p.get("kind") for p in progress]
    assert {"wer", "cer", "bleu4", "rouge_l"} <= set(after_eval[-1]["metrics"])
    assert after_eval[-1]["metrics_step"] % 20 == 0 and after_eval[-1]["metrics_step"] < after_eval[-1]["step"]
    assert run["a"].extra["progress"]["metrics"]


def test_the_training_worker_serves_training_metrics_and_logs_the_job_id(run: dict[str, Any]) -> None:
    assert run["scrapes"], "no metrics were read while A ran"
    text = run["scrapes"][-1].decode()
    assert 'captioner_train_step{job_id="train-a"}' in text and 'captioner_train_eval_wer{job_id="train-a"}' in text
    assert 'captioner_train_jobs_total{outcome="done"} 1.0' in run["final_scrape"]
    assert 'captioner_train_jobs_total{outcome="failed"} 2.0' in run["final_scrape"]  # F and B
    assert 'captioner_train_jobs_total{outcome="cancelled"} 1.0' in run["final_scrape"]  # H
    assert "job=train-a" in run["log"] and "job=train-f" in run["log"]


def test_an_evaluation_not_answered_in_time_is_one_line_and_withdrawn(run: dict[str, Any]) -> None:
    late = run["evaluate_late"]
    assert late.exit_code == 1 and "Traceback" not in late.output
    assert "no evaluation result after 1s" in late.stderr and "it was withdrawn" in late.stderr
    assert run["result_channels_after_late"] == []
    # The worker reached it after A and F and skipped it: only the later evaluation ran.
    assert "Discarding revoked task" in run["log"] and f"{TASK_EVALUATE}[" in run["log"]
    assert "evaluations" not in run["store"].get("champion").meta  # 'current' when it was sent


def test_evaluate_prints_metrics_and_stores_them_with_the_version(run: dict[str, Any]) -> None:
    from training.data import dataset_fingerprint, load_examples

    out = run["evaluate"]
    assert out.exit_code == 0, out.output
    printed = dict(line.split() for line in out.stdout.splitlines())
    assert {"wer", "cer", "bleu4", "rouge_l"} <= set(printed)
    version = run["store"].get(run["a"].extra["result"]["version"])
    latest = version.meta["evaluations"][-1]
    assert latest["fingerprint"] == dataset_fingerprint(load_examples(str(run["data"]))[:6])
    assert f"{latest['metrics']['wer']:.4f}" == printed["wer"] and version.metrics == latest["metrics"]


def test_push_to_hub_writes_a_model_card_first(cli_env: dict[str, str], tmp_path: Path) -> None:
    """The card names base model, data (fingerprint, size), options and metrics with their eval set, and says what
    the model is for; it is written before the upload, which fails here (no network) without promoting."""
    store = ModelStore(tmp_path / "store")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    meta = {
        "base_model": "microsoft/git-base",
        "dataset": "/data/shapes",
        "dataset_fingerprint": "0123abcd",
        "eval_fingerprint": "eval9876",
        "train_examples": 540,
        "eval_examples": 60,
        "steps": 150,
        "params": {"learning_rate": 0.003, "lora_r": 8, "batch_size": 16},
        "metrics": {"wer": 0.125, "bleu4": 61.5},
    }
    store.add(model, meta, "v1")
    out = _cli({**cli_env, "HF_HUB_OFFLINE": "1"}, "promote", "v1", "--push-to-hub", "org/shapes-captioner")
    assert out.exit_code == 1 and "could not push v1 to org/shapes-captioner" in out.stderr
    assert store.current() is None
    card = (store.get("v1").path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-to-text\n")
    assert "base_model: microsoft/git-base" in card and "# org/shapes-captioner" in card
    assert "fingerprint: `0123abcd`" in card and "540 training and 60 held-out images" in card
    assert '"lora_r": 8' in card and "Steps: 150." in card
    assert "| wer | 0.1250 | `eval9876` |" in card and "| bleu4 | 61.5000 | `eval9876` |" in card
    assert "## Intended use and limits" in card and "not for images unlike its training data" in card


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--batch-size", "8", "--set", "per_device_train_batch_size=4"], "set the same option (batch_size)"),
        (["--set", "fp16=true", "--set", "bf16=true"], "fp16 and bf16 are both true"),
        (["--set", "bf16=true", "--set", "mixed_precision=no"], "set the same option (mixed_precision)"),
        (["--set", "warmup_ratio=0.1", "--set", "warmup_steps=5"], "warmup_steps and warmup_ratio"),
        (["--column", "picture"], "no image column 'picture'"),
        (["--text-column", "alt"], "no text column 'alt'"),
    ],
)
def test_alias_clashes_and_missing_columns_are_one_line_and_send_nothing(
    cli_env: dict[str, str], session_root: Path, args: list[str], said: str
) -> None:
    from training.synthetic import make_shapes

    data = session_root / f"cols-{uuid.uuid4().hex[:6]}"
    make_shapes(data, 2, seed=1, size=32)
    out = _cli(cli_env, "train", str(data), *args)
    assert out.exit_code == 1 and said in out.stderr, out.output
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.output
    assert json.loads(_cli(cli_env, "jobs", "--json").stdout) == []


def test_options_a_worker_cannot_serve_are_refused_against_what_workers_report() -> None:
    from training.requests import check_against_workers

    cpu_only = [{"devices": 2, "device_kind": "CPU core", "peft": False, "datasets": True, "tensorboard": True}]
    with pytest.raises(ConfigError, match="3 training processes asked for, but the training workers have at most 2"):
        check_against_workers(TrainRequest(job_id="j", dataset="/d", config={"num_processes": 3}), cpu_only)
    with pytest.raises(ConfigError, match=r"LoRA is asked for, but no training worker has peft.*captioner\[lora\]"):
        check_against_workers(TrainRequest(job_id="j", dataset="/d", config={"lora_r": 8}), cpu_only)
    check_against_workers(TrainRequest(job_id="j", dataset="/d", config={"num_processes": 2}), cpu_only)


def test_training_arguments_names_reach_the_job_as_ours(cli_env: dict[str, str], session_root: Path) -> None:
    from training.synthetic import make_shapes

    data = session_root / f"hf-{uuid.uuid4().hex[:6]}"
    make_shapes(data, 2, seed=1, size=32)
    out = _cli(
        cli_env,
        "train",
        str(data),
        "--per-device-train-batch-size",
        "4",
        "--num-train-epochs",
        "3",
        "--set",
        "gradient_accumulation_steps=2",
        "--set",
        "lr_scheduler_type=cosine",
        "--set",
        "warmup_ratio=0.1",
        "--set",
        "bf16=true",
        "--set",
        "load_best_model_at_end=false",
        "--set",
        "metric_for_best_model=cer",
        "--set",
        "logging_steps=7",
        "--json",
    )
    assert out.exit_code == 0, out.output
    job = json.loads(out.stdout)["job_id"]
    request = JobClient(settings_from(cli_env)).ledger.get_field(job, "request")
    assert request["config"] == {
        "batch_size": 4,
        "epochs": 3,
        "grad_accum": 2,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.1,
        "mixed_precision": "bf16",
        "load_best_at_end": False,
        "metric_for_best": "cer",
        "log_steps": 7,
    }
