"""Real workers with the ledger in the machine's PostgreSQL: a job with duplicate images, captions reused by
content, a worker killed with SIGKILL mid-job, and the CLI's export and status reading the same ledger."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import redis
from click.testing import CliRunner

from cli.main import cli
from producer.jobs import JobClient
from producer.local import WorkerProcess
from tests.conftest import PG_URL, reconciling, redis_url, settings_from, shape_files, snapshot, tally
from tests.test_recovery import recovery_env, wait_for


def test_a_postgres_ledger_survives_a_kill_and_reuses_captions_of_duplicate_images(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path, settings
) -> None:
    from ledger.postgres import PostgresLedger

    prefix = f"captioner_pg_{uuid.uuid4().hex[:8]}"
    env = {
        **recovery_env(worker_env),
        "CAPTIONER_LEDGER_URL": PG_URL,
        "CAPTIONER_KEY_PREFIX": prefix,
        "CAPTIONER_REUSE_CAPTIONS": "true",
    }
    redis.Redis.from_url(env["CAPTIONER_BROKER_URL"]).flushdb()
    originals = shape_files(session_root, "pg", 60, seed=21)
    # 30 more files holding the bytes of 30 of them: an archive with a third duplicates.
    copies = []
    for i, src in enumerate(originals[:30]):
        copy = Path(src).with_name(f"copy-{i:03d}.png")
        shutil.copyfile(src, copy)
        copies.append(str(copy))
    refs = originals + copies
    s = settings_from(env)
    client = JobClient(s)
    assert isinstance(client.ledger, PostgresLedger)
    first = WorkerProcess(env, log=tmp_path / "first.log").start()
    second = None
    try:
        first.wait_ready()
        client.enqueue(refs, job_id="job-pg", chunk_size=4)
        wait_for(
            lambda: client.status("job-pg").ok >= 12 and client.ledger.attempts_open("job-pg") > 0,
            120,
            "the first captions, and items in hand",
        )
        assert first.kill() == -9
        killed_at = client.status("job-pg").ok
        assert 0 < killed_at < len(refs), "the kill must land mid-job"
        before = snapshot(client, "job-pg")
        second = WorkerProcess(env, log=tmp_path / "second.log").start()
        second.wait_ready()
        resent: list[int] = []
        info = client.wait(
            "job-pg", timeout=180, on_tick=lambda _: None, on_stall=reconciling(client, resent), stall_s=8
        )
    finally:
        first.kill()
        if second is not None:
            second.terminate()
    rows = list(client.results("job-pg"))
    figures = tally(
        "kill -9 of a worker whose ledger is PostgreSQL",
        refs,
        rows,
        info,
        before=before,
        reconciled=sum(resent),
        happened="the killed worker's items came back after the visibility "
        "timeout; rows, counters and reused captions all in PostgreSQL",
    )
    assert (figures["lost"], figures["counters_off"], figures["replaced"]) == (0, 0, 0)
    assert (info.state.value, info.total, info.ok, info.error) == ("done", len(refs), len(refs), 0)
    by_ref = {r["ref"]: r for r in rows}
    assert len(by_ref) == len(rows) == len(refs)
    # Every caption, reused or made, is the one the same model gives those bytes in process (fp32 greedy is exact
    # in any batch); a reused caption is found by its image's bytes, so it may come from its twin or from its own
    # attempt that the kill cut short after the caption was made.
    expected = _captions_in_process(worker_env, originals, int(env["CAPTIONER_MAX_LENGTH"]))
    assert {ref: by_ref[ref]["caption"] for ref in originals} == expected
    assert all(by_ref[c]["caption"] == expected[o] for o, c in zip(originals, copies, strict=False))
    reused = [r for r in rows if r.get("reused")]
    assert sum(1 for c in copies if by_ref[c].get("reused")) > 0, "copies enqueued after their originals reuse them"

    # The CLI reads the same ledger: status and an export, with the reuse marked.
    cli_env = {k: v for k, v in env.items() if k.startswith("CAPTIONER_")}
    runner = CliRunner()
    status = runner.invoke(cli, ["status", "job-pg", "--json"], env=cli_env)
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["ok"] == len(refs)
    out = tmp_path / "pg.jsonl"
    export = runner.invoke(cli, ["export", "job-pg", "-o", str(out)], env=cli_env)
    assert export.exit_code == 0, export.output
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["ref"] for r in exported) == sorted(refs)
    assert sum(1 for r in exported if r.get("reused")) == len(reused)
    client.close()
    pg = PostgresLedger(PG_URL, prefix)
    pg._run(f"DROP SCHEMA IF EXISTS {pg.schema} CASCADE")
    pg.close()
    redis.Redis.from_url(redis_url(int(env["CAPTIONER_BROKER_URL"].rsplit("/", 1)[1]))).flushdb()


def _captions_in_process(worker_env: dict[str, str], paths: list[str], max_length: int) -> dict[str, str]:
    from PIL import Image

    from common.messages import GenParams
    from model.engine import CaptionEngine, EngineConfig

    engine = CaptionEngine.load(EngineConfig(model=worker_env["CAPTIONER_MODEL"], device="cpu", dtype="float32"))
    images = [Image.open(p).convert("RGB") for p in paths]
    return dict(zip(paths, engine.caption(images, GenParams(max_length=max_length)), strict=True))


def test_doctor_checks_the_postgres_ledger_and_config_masks_its_password(worker_env: dict[str, str]) -> None:
    runner = CliRunner()
    env = {**worker_env, "CAPTIONER_LEDGER_URL": PG_URL}
    checks = {c["name"]: c for c in json.loads(runner.invoke(cli, ["doctor", "--json"], env=env).stdout)}
    assert checks["ledger reachable"]["level"] == "ok" and "PostgreSQL" in checks["ledger reachable"]["detail"]
    broken = {**env, "CAPTIONER_LEDGER_URL": "postgresql://captioner:s3cret@127.0.0.1:1/none"}
    out = runner.invoke(cli, ["doctor", "--json"], env=broken)
    assert out.exit_code == 1
    failed = {c["name"]: c for c in json.loads(out.stdout)}["ledger reachable"]
    assert failed["level"] == "fail" and "s3cret" not in out.output and "****" in failed["detail"]
    shown = json.loads(runner.invoke(cli, ["config", "--json"], env=broken).stdout)
    assert shown["CAPTIONER_LEDGER_URL"] == "postgresql://captioner:****@127.0.0.1:1/none"
    wrong = runner.invoke(cli, ["jobs"], env={**env, "CAPTIONER_LEDGER_URL": "mysql://x@h/db"})
    assert wrong.exit_code == 1 and "must be a postgresql:// URL" in wrong.stderr and "Traceback" not in wrong.output


def test_nul_bytes_in_shard_members_parquet_text_and_list_lines_are_rows_with_the_postgres_ledger(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    """A NUL in a shard's .txt member used to fail every write of the shard (`\\u0000 cannot be converted to text`):
    the container stayed open and the job never finished. A NUL in a list line made `enqueue` print a traceback."""
    import io
    import tarfile

    from ledger.postgres import PostgresLedger

    prefix = f"captioner_nul_{uuid.uuid4().hex[:8]}"
    queue = f"captions-nul-{uuid.uuid4().hex[:8]}"
    env = {
        **worker_env,
        "CAPTIONER_LEDGER_URL": PG_URL,
        "CAPTIONER_KEY_PREFIX": prefix,
        "CAPTIONER_CAPTION_QUEUE": queue,
        "CAPTIONER_INTERACTIVE_QUEUE": f"{queue}-now",
    }
    images = [Path(p).read_bytes() for p in shape_files(session_root, "nul", 3, seed=5)]
    shard = session_root / f"nul-{uuid.uuid4().hex[:6]}.tar"
    with tarfile.open(shard, "w") as tar:
        for i, data in enumerate(images):
            for ext, body in (("png", data), ("txt", f"alt\x00text {i}\x00".encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = session_root / f"nul-{uuid.uuid4().hex[:6]}.parquet"
    pq.write_table(
        pa.table(
            {
                "image": pa.array(
                    [{"bytes": c, "path": f"{i}.png"} for i, c in enumerate(images)],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
                ),
                "text": pa.array([f"caption\x00{i}" for i in range(3)], pa.string()),
            }
        ),
        parquet,
    )
    good = shape_files(session_root, "nul-list", 1, seed=6)[0]
    listing = tmp_path / "list.txt"
    listing.write_bytes(f"{good}\n{session_root}/bad\x00name.png\n".encode())
    worker = WorkerProcess(env, log=tmp_path / "worker.log").start()
    runner = CliRunner()
    client = JobClient(settings_from(env))
    try:
        worker.wait_ready()
        sent = runner.invoke(cli, ["enqueue", str(shard), "--json"], env=env)
        assert sent.exit_code == 0, sent.output
        job_id = json.loads(sent.output.strip().splitlines()[-1])["job_id"]
        # Before, the shard's writes failed on every attempt: its container stayed open and the job never ended.
        wait_for(lambda: client.status(job_id).state.value == "done", 120, "the shard's job to finish")
        job = client.status(job_id)
        assert (job.ok, job.total, job.containers) == (3, 3, 0)
        sent = runner.invoke(cli, ["enqueue", str(parquet), "--json"], env=env)
        assert sent.exit_code == 0, sent.output
        parquet_id = json.loads(sent.output.strip().splitlines()[-1])["job_id"]
        wait_for(lambda: client.status(parquet_id).state.value == "done", 120, "the Parquet job to finish")
        parquet_rows = {r["ref"].rsplit("#", 1)[1]: r for r in client.results(parquet_id)}
        listed = runner.invoke(cli, ["enqueue", str(listing), "--wait", "--json"], env=env)
        assert listed.exit_code == 0 and listed.exception is None, listed.output  # the job's summary, no traceback
        listed_job = json.loads(listed.output.strip().splitlines()[-1])["job"]
        shard_rows = {r["ref"].rsplit("#", 1)[1]: r for r in client.results(job_id)}
        list_rows = {r["ref"]: r for r in client.results(listed_job["id"])}
    finally:
        client.close()
        worker.terminate()
        pg = PostgresLedger(PG_URL, prefix)
        pg._run(f"DROP SCHEMA IF EXISTS {pg.schema} CASCADE")
        pg.close()
    expected = {f"s{i}": {"txt": f"alt\x00text {i}\x00"} for i in range(3)}
    assert {k: r["extra"] for k, r in shard_rows.items()} == expected
    assert {k: (r["status"], r["extra"]) for k, r in parquet_rows.items()} == {
        str(i): ("ok", {"text": f"caption\x00{i}"}) for i in range(3)
    }
    assert list_rows[good]["status"] == "ok" and listed_job["state"] == "done"
    bad = list_rows[f"{session_root}/bad\x00name.png"]
    assert (bad["status"], bad["error_class"], bad["error"]) == ("error", "invalid_input", "path contains a NUL byte")
