"""The captioner CLI as a user runs it: real Redis, the session's real worker, click's CliRunner."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from cli.main import cli
from common.settings import Settings
from exports import flatten_row, read_rows
from tests.conftest import direct_captions, image_server
from tests.test_recovery import wait_for


def invoke(settings: Settings, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the CLI with the test's Redis; returns (exit code, stdout, stderr)."""
    base = [
        "--broker-url",
        settings.broker_url_str,
        "--redis-url",
        settings.redis_url_str,
        "--key-prefix",
        settings.key_prefix,
    ]
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


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CAPTIONER_MAX_BATCH_SIZE": "many"}, "error: bad setting max_batch_size: Input should be a valid integer"),
        ({"CAPTIONER_BROKER_URL": "rediss://127.0.0.1:6379/0"}, "error: rediss:// needs CAPTIONER_REDIS_SSL_CA_CERTS"),
    ],
)
def test_bad_setting_in_environment_is_one_line(env: dict[str, str], message: str) -> None:
    result = CliRunner().invoke(cli, ["jobs"], env=env, catch_exceptions=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_producer_never_imports_torch() -> None:
    code = (
        "import sys, cli.main, producer.jobs, producer.sources, cli.demo, runtime.celery_app, exports.export;"
        "import training.config, training.jobs;"  # the producer checks a fine-tune's config before sending it
        "from cli.main import cli;"
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
    from cli.main import FORMATS
    from exports import FORMATS as SINK_FORMATS

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
    from runtime.celery_app import create_app
    from tests.conftest import settings_from

    with LocalRedis() as server:
        env = {
            **worker_env,
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_RESULT_BACKEND": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(1),
            "CAPTIONER_MODEL": "/no/such/model",
        }
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
    code, out, err = invoke(
        settings, "wait", "job-stalled", "--stall-after", "1", "--reconcile", "--timeout", "60", "--json", env=cli_env
    )
    assert code == 0, err
    assert "re-sent 3 item(s)" in err and json.loads(out.splitlines()[-1])["ok"] == 3


# --- the job commands, as a user runs them against the session's real worker ------------------------------------


def _wait_json(settings: Settings, job: str, env: dict[str, str]) -> dict:
    code, out, err = invoke(settings, "wait", job, "--json", "--timeout", "120", env=env)
    assert code == 0, err
    return json.loads(out.splitlines()[-1])


def _rows(settings: Settings, job: str) -> dict[str, dict]:
    code, out, err = invoke(settings, "export", job, "--format", "jsonl", "-o", "-")
    assert code == 0, err
    return {row["ref"]: row for row in map(json.loads, out.splitlines())}


@pytest.mark.usefixtures("caption_worker")
def test_failures_then_retry_once_the_cause_is_fixed(
    settings: Settings, cli_env: dict[str, str], images: Path, tmp_path: Path
) -> None:
    """A file missing when the job ran: `failures` names it with its class and attempts; once it is there, `retry`
    queues it, and only it, again, and the job ends with every item captioned."""
    late = images / "late.jpg"
    listing = tmp_path / "refs.txt"
    listing.write_text("".join(f"{p}\n" for p in [*sorted(images.glob("*.jpg")), late]))
    code, out, err = invoke(settings, "enqueue", str(listing), "--wait", "--json", env=cli_env)
    assert code == 0, err
    job = json.loads(out)["job"]
    assert (job["ok"], job["error"], job["state"]) == (10, 1, "done")

    code, out, _ = invoke(settings, "failures", job["id"], "--json", env=cli_env)
    groups = json.loads(out)
    assert list(groups) == ["fetch_error"] and len(groups["fetch_error"]) == 1
    failed = groups["fetch_error"][0]
    assert (failed["ref"], failed["attempts"], failed["error"]) == (str(late), 1, f"no such file: {late}")
    code, out, _ = invoke(settings, "failures", job["id"], env=cli_env)
    assert code == 0 and out.splitlines() == ["fetch_error: 1", f"  {late}  (attempts 1): no such file: {late}"]

    before = _rows(settings, job["id"])
    shutil.copy(sorted(images.glob("*.jpg"))[0], late)  # the cause, fixed
    code, out, err = invoke(settings, "retry", job["id"], "--json", env=cli_env)
    assert code == 0 and json.loads(out) == {"job_id": job["id"], "requeued": 1}, err
    done = _wait_json(settings, job["id"], cli_env)
    assert (done["state"], done["ok"], done["error"], done["total"]) == ("done", 11, 0, 11)
    after = _rows(settings, job["id"])
    assert after[str(late)]["status"] == "ok" and after[str(late)]["caption"]
    assert all(after[ref] == row for ref, row in before.items() if ref != str(late)), "retry redid captioned items"
    code, out, _ = invoke(settings, "failures", job["id"], env=cli_env)
    assert out.strip() == f"no failed items in {job['id']}"


@pytest.mark.usefixtures("caption_worker")
def test_reconcile_sends_again_what_the_broker_lost(settings: Settings, cli_env: dict[str, str], images: Path) -> None:
    """The job's messages went to a queue that was then lost (a broker without AOF, restarted): the job waits
    forever until `captioner reconcile` sends its pending items again from the manifest."""
    lost = {**cli_env, "CAPTIONER_CAPTION_QUEUE": f"lost-{uuid.uuid4().hex[:8]}"}
    code, out, err = invoke(settings, "enqueue", str(images), "--json", env=lost)
    assert code == 0, err
    job = json.loads(out)["job_id"]
    broker = redis.Redis.from_url(settings.broker_url_str)
    assert broker.llen(lost["CAPTIONER_CAPTION_QUEUE"]) == 1
    broker.delete(lost["CAPTIONER_CAPTION_QUEUE"])  # the broker loses the message
    code, out, _ = invoke(settings, "status", job, "--json", env=cli_env)
    assert (json.loads(out)["pending"], json.loads(out)["state"]) == (10, "running")
    code, out, err = invoke(settings, "reconcile", job, "--json", env=cli_env)
    assert code == 0 and json.loads(out) == {"job_id": job, "requeued": 10}, err
    done = _wait_json(settings, job, cli_env)
    assert (done["state"], done["ok"], done["pending"]) == ("done", 10, 0)
    code, out, _ = invoke(settings, "reconcile", job, env=cli_env)
    assert out.strip() == f"re-queued 0 pending item(s) of {job}"  # nothing pending: nothing sent twice


@pytest.fixture
def gated_images(images: Path):
    """An HTTP server of the folder's first image under 40 names: the first six requests are answered at once, the
    rest wait until the test opens the gate. Yields (urls, requested paths in order, gate)."""
    requested: list[str] = []
    gate = threading.Event()

    def answer(path: str) -> bool:
        requested.append(path)
        if len(requested) > 6:
            gate.wait(60)
        return True

    with image_server(sorted(images.glob("*.jpg"))[0].read_bytes(), answer) as base:
        yield [f"{base}/img-{i:02d}.jpg" for i in range(40)], requested, gate
        gate.set()


def test_cancel_while_a_worker_is_captioning(
    settings: Settings, cli_env: dict[str, str], caption_worker, gated_images, tmp_path: Path
) -> None:
    """`captioner cancel` mid-flight: the chunks a worker holds finish, every chunk it takes after the cancel is
    recorded cancelled unseen (its images are never even fetched), and the job ends `cancelled` with
    ok + cancelled = total."""
    urls, requested, gate = gated_images
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{u}\n" for u in urls))
    code, out, err = invoke(settings, "enqueue", str(listing), "--chunk-size", "1", "--json", env=cli_env)
    assert code == 0, err
    job = json.loads(out)["job_id"]
    # The session worker's settings: one-image chunks it can hold at once, each fetched by a decode thread.
    in_hand = min(settings.concurrency, settings.decode_threads)
    # Six captioned, then every one of the worker's threads holds a chunk whose image is stuck behind the gate.
    wait_for(lambda: len(requested) >= 6 + in_hand, 60, "the worker to hold chunks behind the gate")
    code, out, err = invoke(settings, "cancel", job, "--json", env=cli_env)
    seen_before_cancel = {u.rsplit("/", 1)[1] for u in requested}
    gate.set()
    assert code == 0 and json.loads(out)["state"] == "cancelled", err
    done = _wait_json(settings, job, cli_env)
    assert (done["state"], done["error"], done["pending"]) == ("cancelled", 0, 0)
    assert done["ok"] + done["cancelled"] == done["total"] == 40 and done["cancelled"] > 0
    rows = _rows(settings, job)
    captioned = {ref.rsplit("/", 1)[1] for ref, row in rows.items() if row["status"] == "ok"}
    # Only images whose chunks were in hand at the cancel were captioned; nothing taken after it was.
    assert captioned <= seen_before_cancel and len(captioned) == done["ok"] >= 6
    assert {row["status"] for ref, row in rows.items() if ref.rsplit("/", 1)[1] not in captioned} == {"cancelled"}


@pytest.mark.usefixtures("caption_worker")
def test_dataset_exports_and_exclude_flags_through_the_cli(
    settings: Settings, cli_env: dict[str, str], images: Path, tmp_path: Path
) -> None:
    """WebDataset shards and kohya JSON of a real job hold each image with its ledger caption; --exclude-flags
    leaves out exactly the captions carrying the flag (here: cut at a max_length of 5)."""
    import tarfile

    code, out, err = invoke(settings, "enqueue", str(images), "--max-length", "5", "--wait", "--json", env=cli_env)
    assert code == 0, err
    job = json.loads(out)["job"]["id"]
    rows = _rows(settings, job)
    flagged = {ref for ref, row in rows.items() if "truncated" in (row.get("flags") or [])}
    assert len(rows) == 10 and flagged, "a random tiny GIT does not end a caption within 5 tokens"

    def shards(*extra: str) -> dict[str, dict[str, bytes]]:
        target = tmp_path / f"wds-{uuid.uuid4().hex[:6]}"
        code, _, err = invoke(settings, "export", job, "--format", "webdataset", "-o", str(target), *extra, env=cli_env)
        assert code == 0, err
        samples: dict[str, dict[str, bytes]] = {}
        for shard in sorted(target.glob("*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        return samples

    by_id = {row["id"]: row for row in rows.values()}
    every = shards("--shard-size", "4")
    assert set(every) == set(by_id)
    for key, sample in every.items():
        row = by_id[key]
        assert sample["jpg"] == Path(row["ref"]).read_bytes()
        assert sample["txt"].decode() == row["caption"] and json.loads(sample["json"]) == row
    kept = shards("--exclude-flags", "truncated")
    assert {by_id[k]["ref"] for k in kept} == set(rows) - flagged

    kohya = tmp_path / "kohya.json"
    code, _, err = invoke(
        settings, "export", job, "--format", "kohya", "-o", str(kohya), "--exclude-flags", "truncated"
    )
    assert code == 0, err
    assert json.loads(kohya.read_text()) == {ref: {"caption": rows[ref]["caption"]} for ref in set(rows) - flagged}
    code, _, err = invoke(settings, "export", job, "--format", "kohya", "-o", str(tmp_path / "all.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "all.json").read_text()) == {
        ref: {"caption": r["caption"]} for ref, r in rows.items()
    }


@pytest.mark.usefixtures("caption_worker")
def test_max_length_fifty_runs_when_none_is_given_and_a_small_one_bounds_the_caption(
    settings: Settings, cli_env: dict[str, str], images: Path, tiny_model: Path
) -> None:
    """`captioner enqueue` with no --max-length and no CAPTIONER_MAX_LENGTH captions at 50 tokens (the worker's own
    setting of 12 applies only to calls that leave it out); --max-length 4 cuts each caption to 4 positions."""
    env = {k: v for k, v in cli_env.items() if k != "CAPTIONER_MAX_LENGTH"}
    paths = sorted(images.glob("*.jpg"))[:3]
    expected = {n: direct_captions(tiny_model, paths, n) for n in (4, 12, 50)}
    assert expected[50] != expected[12], "the tiny GIT must run past 12 tokens for this test to tell 50 from 12"
    for args, n in (((), 50), (("--max-length", "4"), 4)):
        code, out, err = invoke(settings, "enqueue", *map(str, paths), *args, "--wait", "--json", env=env)
        assert code == 0, err
        job = json.loads(out)["job"]
        assert job["params"]["max_length"] == n and job["ok"] == 3
        rows = _rows(settings, job["id"])
        assert {ref: row["caption"] for ref, row in rows.items()} == expected[n]
        assert all(row["params"]["max_length"] == n for row in rows.values())
    # [CLS] takes the first of the 4 positions: at most 3 caption tokens, so at most 3 words.
    assert all(len(caption.split()) <= 3 for caption in expected[4].values())


def test_paths_outside_the_allowed_roots_are_warned_about_by_the_producer(
    settings: Settings, cli_env: dict[str, str], images: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(sorted(images.glob("*.jpg"))[0], outside / "a.jpg")
    code, _, err = invoke(settings, "enqueue", str(images), env=cli_env)
    assert code == 0 and "warning" not in err, err
    code, _, err = invoke(settings, "enqueue", str(outside), env=cli_env)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 1, err
    assert str(outside / "a.jpg") in warnings[0] and "outside CAPTIONER_ALLOWED_ROOTS" in warnings[0]
    assert cli_env["CAPTIONER_ALLOWED_ROOTS"] in warnings[0]
