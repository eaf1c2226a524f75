"""Operating it: the metrics endpoint, JSON logs with ids, `captioner config` and `captioner doctor`."""

from __future__ import annotations

import json
import threading
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis
from click.testing import CliRunner

from cli.main import cli
from producer.jobs import JobClient
from producer.local import LocalRedis, WorkerProcess, free_port
from tests.conftest import settings_from
from tests.test_recovery import wait_for


class _Unavailable(BaseHTTPRequestHandler):
    """Every GET is a 503: a transient failure, retried with backoff."""

    def do_GET(self) -> None:
        self.send_error(503)

    def log_message(self, *args: object) -> None:
        pass


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in a Prometheus text page, or None when it is absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    return None


def test_metrics_endpoint_and_json_logs_of_a_real_worker(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    from common.messages import TrainRequest
    from training.synthetic import make_shapes

    port = free_port()
    folder = session_root / f"ops-{uuid.uuid4().hex[:6]}"
    refs = [str(p) for p, _ in make_shapes(folder, 6, seed=4, size=32)]
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    down = f"http://127.0.0.1:{http.server_address[1]}/down.jpg"
    with LocalRedis() as server:
        env = {
            **worker_env,
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_RESULT_BACKEND": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(1),
            "CAPTIONER_METRICS_PORT": str(port),
            "CAPTIONER_METRICS_ADDR": "127.0.0.1",
            "CAPTIONER_LOG_JSON": "true",
            "CAPTIONER_MAX_ATTEMPTS": "2",
            "CAPTIONER_LEDGER_TTL_S": "5",
        }
        training_queue = env["CAPTIONER_TRAINING_QUEUE"]
        with WorkerProcess(env, log=tmp_path / "w.log") as proc:
            proc.wait_ready()
            client = JobClient(settings_from(env))
            client.enqueue([*refs, str(folder / "broken.png"), down], job_id="job-metrics")
            # A fine-tune no training worker takes: the training queue's depth is 1 until someone does.
            client.submit_training(TrainRequest(job_id="train-queued", dataset=str(tmp_path / "none")))
            client.wait("job-metrics", timeout=60, on_tick=lambda _: None)
            client.close()
            # The sampler reads queue depths every 5 s.
            wait_for(
                lambda: _sample(_scrape(port), "captioner_queue_depth", queue=training_queue) == 1.0,
                120,
                "the training queue's depth to be sampled",
            )
            text = _scrape(port)

            # CAPTIONER_LEDGER_TTL_S: the finished job leaves the ledger once its time is up; the queued fine-tune,
            # not finished, stays.
            def expired() -> bool:
                result = CliRunner().invoke(cli, ["status", "job-metrics"], env=env)
                return result.exit_code == 1 and "no job 'job-metrics'" in result.stderr

            wait_for(expired, 60, "the finished job's keys to expire")
            assert CliRunner().invoke(cli, ["status", "train-queued"], env=env).exit_code == 0
    http.shutdown()
    http.server_close()
    assert _sample(text, "captioner_images_total", status="ok") == 6.0
    assert _sample(text, "captioner_errors_total", error_class="decode_error") == 1.0
    # The 503 item failed twice but is one item: only its final row is counted.
    assert _sample(text, "captioner_errors_total", error_class="fetch_error") == 1.0
    assert _sample(text, "captioner_retries_total") == 1.0, "the 503 was retried once (CAPTIONER_MAX_ATTEMPTS=2)"
    assert _sample(text, "captioner_queue_depth", queue=env["CAPTIONER_CAPTION_QUEUE"]) == 0.0
    assert _sample(text, "captioner_batch_size_count") >= 1
    assert _sample(text, "captioner_stage_seconds_count", stage="infer") >= 1
    assert _sample(text, "captioner_stage_seconds_count", stage="load") == 6.0, "one load per captioned image"
    assert _sample(text, "captioner_stage_seconds_sum", stage="load") > 0
    # One write per chunk: the job's chunk, then the chunk that carried the retried URL.
    assert _sample(text, "captioner_stage_seconds_count", stage="write") == 2.0
    assert _sample(text, "captioner_stage_seconds_sum", stage="write") > 0
    assert 'captioner_model_info{device="cpu",dtype="float32",version="tiny-git@' in text
    lines = [json.loads(line) for line in proc.log_path.read_text().splitlines() if line.startswith("{")]
    chunk_lines = [entry for entry in lines if entry["msg"].startswith("chunk job=job-metrics")]
    assert chunk_lines and all(e["job_id"] == "job-metrics" and e["task_id"] != "-" for e in chunk_lines)


def test_config_prints_every_setting_with_secrets_masked() -> None:
    env = {
        "CAPTIONER_BROKER_URL": "redis://app:hunter2@cache:6379/0",
        "CAPTIONER_MAX_BATCH_SIZE": "48",
        "CAPTIONER_RESULT_BACKEND": "redis://:backend-pw@[::1]:6380/2",
        "CAPTIONER_WEBHOOK_SECRET": "whsec-topsecret://not-a-url",
    }
    for args in (["config", "--json"], ["config"]):
        result = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        for secret in ("hunter2", "backend-pw", "topsecret", "not-a-url"):
            assert secret not in result.output, f"{secret} printed by captioner {' '.join(args)}"
    values = json.loads(CliRunner().invoke(cli, ["config", "--json"], env=env).stdout)
    assert values["CAPTIONER_BROKER_URL"] == "redis://app:****@cache:6379/0"
    assert values["CAPTIONER_REDIS_URL"] == "redis://app:****@cache:6379/0"  # defaults to the broker, masked too
    assert values["CAPTIONER_RESULT_BACKEND"] == "redis://:****@[::1]:6380/2"
    assert values["CAPTIONER_WEBHOOK_SECRET"] == "****"
    assert values["CAPTIONER_MAX_BATCH_SIZE"] == 48


def test_doctor_fails_without_persistence_or_workers_and_passes_on_a_sound_setup(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    with LocalRedis() as bare:
        result = CliRunner().invoke(cli, ["--broker-url", bare.url(0), "doctor", "--json"], catch_exceptions=False)
        checks = {c["name"]: c["level"] for c in json.loads(result.stdout)}
        assert result.exit_code == 1
        assert checks["broker persistence"] == "fail" and checks["caption workers"] == "fail"
    with LocalRedis(appendonly=True) as sound:
        env = {
            **worker_env,
            "CAPTIONER_BROKER_URL": sound.url(0),
            "CAPTIONER_RESULT_BACKEND": sound.url(0),
            "CAPTIONER_REDIS_URL": sound.url(1),
        }
        with WorkerProcess(env, log=tmp_path / "w.log") as proc:
            proc.wait_ready()
            result = CliRunner().invoke(cli, ["doctor", "--json"], env=env, catch_exceptions=False)
            checks = {c["name"]: c for c in json.loads(result.stdout)}
            assert result.exit_code == 0, result.stdout
            assert "tiny-git@" in checks["caption workers"]["detail"]
            # The same sound setup, but Redis may evict keys when full: queue and ledger keys could vanish.
            redis.Redis(port=sound.port).config_set("maxmemory-policy", "allkeys-lru")
            code, checks = _doctor(env)
    assert code == 1
    assert [(c["name"], c["detail"]) for c in checks.values() if c["level"] == "fail"] == [
        ("broker eviction", "maxmemory-policy allkeys-lru may silently drop queue or ledger keys")
    ]
    result = CliRunner().invoke(cli, ["--broker-url", "redis://127.0.0.1:1/0", "doctor"], catch_exceptions=False)
    assert result.exit_code == 1 and "broker reachable" in result.stdout


def _doctor(env: dict[str, str]) -> tuple[int, dict[str, dict[str, str]]]:
    result = CliRunner().invoke(cli, ["doctor", "--json"], env=env, catch_exceptions=False)
    return result.exit_code, {c["name"]: c for c in json.loads(result.stdout)}


def test_doctor_warns_when_redis_answers_anyone_beyond_loopback() -> None:
    with LocalRedis(appendonly=True) as server:
        env = {"CAPTIONER_BROKER_URL": server.url(0), "CAPTIONER_REDIS_URL": server.url(1)}
        admin = redis.Redis(port=server.port)
        _, checks = _doctor(env)
        assert "ledger access" not in checks, "one server, one set of checks"
        assert checks["broker access"]["level"] == "ok" and "loopback only" in checks["broker access"]["detail"]
        # 192.0.2.1 (TEST-NET) is on no interface; "-" makes it optional, so Redis binds 127.0.0.1 only but
        # reports both, exactly as a server configured beyond loopback would.
        admin.config_set("bind", "127.0.0.1 -192.0.2.1")
        admin.config_set("protected-mode", "no")
        _, checks = _doctor(env)
        assert checks["broker access"]["level"] == "warn", checks["broker access"]
        assert "beyond loopback" in checks["broker access"]["detail"]
        admin.config_set("protected-mode", "yes")
        assert _doctor(env)[1]["broker access"]["level"] == "ok"
    with LocalRedis(appendonly=True, password="doctor-pw") as server:
        env = {"CAPTIONER_BROKER_URL": server.url(0)}
        redis.Redis(port=server.port, password="doctor-pw").config_set("bind", "127.0.0.1 -192.0.2.1")
        _, checks = _doctor(env)
        assert checks["broker persistence"]["level"] == "ok"
        assert checks["broker access"] == {
            "name": "broker access",
            "level": "ok",
            "detail": "a password or ACL user is required",
        }


def test_doctor_tells_training_from_caption_workers_and_sees_a_stale_model(
    worker_env: dict[str, str], tiny_model: Path, tmp_path: Path
) -> None:
    from common.messages import TrainRequest
    from common.store import ModelStore

    store = ModelStore(tmp_path / "store")
    store.promote(store.add(tiny_model, {"base_model": "tiny"}, "v-one").version)
    store.add(tiny_model, {"base_model": "tiny"}, "v-two")
    with LocalRedis(appendonly=True) as server:
        env = {
            **worker_env,
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_RESULT_BACKEND": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(1),
            "CAPTIONER_MODEL": "@current",
            "CAPTIONER_MODEL_STORE": str(store.root),
            "CAPTIONER_MODEL_POLL_S": "3600",
        }
        with WorkerProcess(env, log=tmp_path / "caption.log") as caption:
            caption.wait_ready()
            client = JobClient(settings_from(env))
            client.submit_training(TrainRequest(job_id="train-waiting", dataset=str(tmp_path / "none")))
            client.close()
            code, checks = _doctor(env)
            assert code == 0, checks
            assert checks["training workers"]["level"] == "warn", checks["training workers"]
            assert "1 job(s) waiting" in checks["training workers"]["detail"]
            assert checks["model version"]["level"] == "ok" and "v-one" in checks["model version"]["detail"]

            store.promote("v-two")  # the worker polls hourly here, so it still serves v-one
            _, checks = _doctor(env)
            assert checks["model version"]["level"] == "warn"
            assert f"{caption.name} serves v-one" in checks["model version"]["detail"]
            assert "current is v-two" in checks["model version"]["detail"]

            redis.Redis.from_url(server.url(0)).delete(env["CAPTIONER_TRAINING_QUEUE"])
            with WorkerProcess(env, training=True, log=tmp_path / "train.log") as trainer:
                trainer.wait_ready()
                code, checks = _doctor(env)
    assert checks["training workers"]["level"] == "ok" and trainer.name in checks["training workers"]["detail"]
    assert checks["caption workers"]["detail"].startswith("1 online;"), checks["caption workers"]
    assert trainer.name not in checks["caption workers"]["detail"]


def test_plain_celery_worker_command_serves_too(worker_env: dict[str, str], tmp_path: Path, session_root: Path) -> None:
    """A bare `celery -A worker.celery_app worker` works as well as `captioner worker`: same app, same warm-up, and
    the app's own defaults (threads pool, both caption queues) rather than Celery's prefork, which would fork the
    loaded model."""
    import sys

    from common.messages import TASK_CAPTION
    from runtime.celery_app import create_app
    from training.synthetic import make_shapes

    (path, _), *_ = make_shapes(session_root / f"plain-{uuid.uuid4().hex[:6]}", 1, seed=11, size=32)
    with LocalRedis() as server:
        env = {
            **worker_env,
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_RESULT_BACKEND": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(1),
        }
        argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO"]
        with WorkerProcess(env, argv=argv, log=tmp_path / "celery.log") as proc:
            proc.wait_ready()
            row = create_app(settings_from(env)).send_task(TASK_CAPTION, args=[str(path)]).get(timeout=60)
    assert row["status"] == "ok" and row["model_version"].startswith("tiny-git@")
    log = proc.log_path.read_text()
    assert "serves model tiny-git@" in log and "(thread)" in log
