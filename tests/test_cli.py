"""The captioner CLI as a user runs it: real Redis, the session's real worker, click's CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from common.settings import Settings
from producer.cli import cli
from producer.export import flatten_row, read_rows


def invoke(settings: Settings, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the CLI with the test's Redis; returns (exit code, stdout, stderr)."""
    base = ["--broker-url", settings.broker_url_str, "--redis-url", settings.redis_url_str,
            "--key-prefix", settings.key_prefix]  # fmt: skip
    result = CliRunner().invoke(cli, [*base, *args], env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def cli_env(worker_env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in worker_env.items() if k.startswith("CAPTIONER_")}


@pytest.mark.usefixtures("caption_worker")
def test_enqueue_wait_status_jobs_and_every_export_round_trips(
    settings: Settings, cli_env: dict[str, str], images: Path, tmp_path: Path
) -> None:
    code, out, err = invoke(settings, "enqueue", str(images), "--wait", "--json", "--chunk-size", "3", env=cli_env)
    assert code == 0, err
    data = json.loads(out)
    job = data["job"]["id"]
    assert data["enqueue"]["items"] == 10 and data["enqueue"]["messages"] == 4
    assert (data["job"]["state"], data["job"]["ok"]) == ("done", 10)

    code, out, _ = invoke(settings, "status", job, "--json", env=cli_env)
    assert json.loads(out)["ok"] == 10
    code, out, _ = invoke(settings, "jobs", "--json", env=cli_env)
    assert job in [j["id"] for j in json.loads(out)]

    code, out, _ = invoke(settings, "export", job, "--format", "jsonl", "-o", "-", env=cli_env)
    ledger_rows = sorted((json.loads(line) for line in out.splitlines()), key=lambda r: r["id"])
    assert len(ledger_rows) == 10 and all(r["caption"] for r in ledger_rows)
    for fmt in ("jsonl", "csv", "parquet"):
        target = tmp_path / f"out.{fmt}"
        code, _, err = invoke(settings, "export", job, "--format", fmt, "-o", str(target), env=cli_env)
        assert code == 0, err
        back = sorted(read_rows(target, fmt), key=lambda r: r["id"])
        expected = ledger_rows if fmt == "jsonl" else [flatten_row(r) for r in ledger_rows]
        assert back == expected, fmt
    code, _, err = invoke(settings, "export", job, "--format", "sidecar", env=cli_env)
    assert code == 0, err
    for row in ledger_rows:
        assert Path(row["ref"]).with_suffix(".txt").read_text() == row["caption"] + "\n"


def test_resumed_enqueue_derives_the_same_job_id(settings: Settings, cli_env: dict[str, str], images: Path) -> None:
    _, first, _ = invoke(settings, "enqueue", str(images), "--json", env=cli_env)
    _, second, _ = invoke(settings, "enqueue", str(images), "--json", env=cli_env)
    a, b = json.loads(first), json.loads(second)
    assert a["job_id"] == b["job_id"] and a["created"] and not b["created"]
    _, other, _ = invoke(settings, "enqueue", str(images), "--max-length", "7", "--json", env=cli_env)
    assert json.loads(other)["job_id"] != a["job_id"]  # other parameters, another job


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", "no-such-job"], "no job 'no-such-job'"),
        (["export", "no-such-job"], "no job 'no-such-job'"),
        (["enqueue", "/no/such/dir"], "no such file"),
        (["enqueue", "EMPTY"], "hold no image"),
        (["enqueue", "GLOB/*.png"], "matches no file"),
    ],
)
def test_user_mistakes_are_one_line_without_traceback(
    settings: Settings, cli_env: dict[str, str], tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "empty").mkdir()
    args = [a.replace("EMPTY", str(tmp_path / "empty")).replace("GLOB", str(tmp_path)) for a in args]
    code, out, err = invoke(settings, *args, env=cli_env)
    assert code == 1
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in out + err


def test_unreachable_broker_is_one_clear_line_and_nothing_is_written(tmp_path: Path, images: Path) -> None:
    down = "redis://127.0.0.1:1/0"
    result = CliRunner().invoke(cli, ["--broker-url", down, "enqueue", str(images)], catch_exceptions=False)
    assert result.exit_code == 1
    assert "cannot reach" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [["enqueue", "x", "--max-length", "0"], ["enqueue"], ["export", "j", "--format", "xml"], ["nope"]],
)
def test_bad_options_are_usage_errors(settings: Settings, args: list[str]) -> None:
    code, out, err = invoke(settings, *args)
    assert code == 2 and "Traceback" not in out + err and "Usage:" in err


def test_bad_setting_in_environment_is_one_line(images: Path) -> None:
    env = {"CAPTIONER_MAX_BATCH_SIZE": "many", "CAPTIONER_BROKER_URL": "rediss://127.0.0.1:6379/0"}
    result = CliRunner().invoke(cli, ["jobs"], env=env, catch_exceptions=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "max_batch_size" in result.stderr or "rediss://" in result.stderr


def test_producer_never_imports_torch() -> None:
    code = (
        "import sys, producer.cli, producer.jobs, producer.sources, producer.demo, worker.celery_app, producer.export;"
        "import training.config, training.jobs;"  # the producer checks a fine-tune's config before sending it
        "from producer.cli import cli;"
        "bad = sorted(m for m in ('torch', 'transformers', 'PIL', 'httpx2') if m in sys.modules);"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_help_lists_every_command() -> None:
    out = CliRunner().invoke(cli, ["--help"]).output
    for name in ("enqueue", "status", "wait", "jobs", "export", "retry", "cancel", "worker", "demo"):
        assert name in out


def test_cli_export_formats_match_the_sinks() -> None:
    from producer.cli import FORMATS
    from producer.export import FORMATS as SINK_FORMATS

    assert FORMATS == SINK_FORMATS


def test_models_and_promote_with_gate_and_a_failing_push(tmp_path: Path) -> None:
    from common.store import ModelStore

    store = ModelStore(tmp_path / "store")
    src = tmp_path / "m"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"x")
    a = store.add(src, {"metrics": {"wer": 0.3}, "eval_fingerprint": "f"}, "a")
    b = store.add(src, {"metrics": {"wer": 0.5}, "eval_fingerprint": "f"}, "b")
    env = {"CAPTIONER_MODEL_STORE": str(store.root), "HF_HUB_OFFLINE": "1"}
    run = CliRunner().invoke
    assert run(cli, ["promote", a.version], env=env).exit_code == 0
    worse = run(cli, ["promote", b.version, "--require-no-worse", "wer"], env=env)
    assert worse.exit_code == 1 and "worse than a on wer" in worse.stderr
    pushed = run(cli, ["promote", b.version, "--push-to-hub", "someone/captioner"], env=env)
    assert pushed.exit_code == 1 and "could not push b" in pushed.stderr and "Traceback" not in pushed.output
    listed = json.loads(run(cli, ["models", "--json"], env=env).stdout)
    assert [(m["version"], m["current"]) for m in listed] == [("a", True), ("b", False)]


def test_worker_options_override_the_settings(worker_env: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    """`captioner worker --model DIR --max-batch-size 3 --concurrency 2` serves that model with those figures."""
    import uuid

    from producer.jobs import workers_info
    from producer.local import LocalRedis, WorkerProcess
    from tests.conftest import settings_from
    from worker.celery_app import create_app

    with LocalRedis() as server:
        env = {**worker_env, "CAPTIONER_BROKER_URL": server.url(0), "CAPTIONER_RESULT_BACKEND": server.url(0),
               "CAPTIONER_REDIS_URL": server.url(1), "CAPTIONER_MODEL": "/no/such/model"}  # fmt: skip
        args = ["--model", str(tiny_model), "--max-batch-size", "3", "--concurrency", "2", "--loglevel", "DEBUG"]
        with WorkerProcess(env, extra_args=args, log=tmp_path / f"w-{uuid.uuid4().hex[:6]}.log") as proc:
            proc.wait_ready()
            info = workers_info(create_app(settings_from(env)), timeout=5)[proc.name]
            log = proc.log_path.read_text()
    assert info["model_version"].startswith("tiny-git@") and info["max_batch_size"] == 3
    assert "concurrency: 2 (thread)" in log and "DEBUG/" in log


def test_a_bad_source_argument_leaves_no_half_job(settings: Settings, images: Path, tmp_path: Path) -> None:
    """`enqueue good_dir missing.txt`: every argument is checked before the job is opened, so nothing is written."""
    bad_list = tmp_path / "refs.csv"
    bad_list.write_text("name,caption\na.jpg,x\n")
    for bad in (str(tmp_path / "missing.txt"), str(bad_list), str(tmp_path / "*.nothing")):
        code, _, err = invoke(settings, "enqueue", str(images), bad, "--job-id", "job-half")
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "job-half" not in invoke(settings, "jobs", "--json")[1]


def test_an_unwritable_export_target_is_one_line(settings: Settings, client) -> None:
    from common.messages import GenParams

    client.ledger.open_job("job-export-ro", "x", GenParams())
    code, _, err = invoke(settings, "export", "job-export-ro", "-o", "/proc/no-such-dir/out.jsonl")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err and "/proc/no-such-dir" in err, err


def test_wait_sees_a_stalled_job_and_reconciles_it(
    settings: Settings, client, images: Path, caption_worker, cli_env: dict[str, str]
) -> None:
    """Items in the manifest whose messages are gone (a broker crash): `wait` says so, `wait --reconcile` fixes it."""
    from common.messages import GenParams, item_id

    refs = [str(p) for p in sorted(images.glob("*.jpg"))[:3]]
    client.ledger.open_job("job-stalled", "stalled", GenParams(max_length=12))
    client.ledger.add_items("job-stalled", [(item_id(r), r) for r in refs])
    client.ledger.seal("job-stalled")
    code, _, err = invoke(settings, "wait", "job-stalled", "--stall-after", "1", "--timeout", "4", env=cli_env)
    assert code == 1 and "captioner reconcile job-stalled" in err
    code, out, err = invoke(settings, "wait", "job-stalled", "--stall-after", "1", "--reconcile", "--timeout", "60",
                            "--json", env=cli_env)  # fmt: skip
    assert code == 0, err
    assert "re-sent 3 item(s)" in err and json.loads(out.splitlines()[-1])["ok"] == 3
