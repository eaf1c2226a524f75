"""Two real workers with no local roots at all caption an S3 prefix and a shard in the same bucket, and the job is
exported back to S3: every item once."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

from click.testing import CliRunner

from cli.main import cli
from common.messages import item_id
from producer.jobs import JobClient
from producer.local import WorkerProcess
from tests.conftest import S3Server, settings_from, shape_files


def test_two_workers_without_local_roots_caption_a_prefix_and_export_to_s3(
    s3: S3Server, bucket: str, worker_env: dict[str, str], session_root: Path, tmp_path: Path, settings
) -> None:  # settings: the ledger DB is flushed for this test
    fs = s3.fs()
    images = [Path(p).read_bytes() for p in shape_files(session_root, "s3src", 12, seed=21)]
    keys = [f"in/{'ab'[i % 2]}/{i:03d}.png" for i in range(len(images))]
    for key, data in zip(keys, images, strict=True):
        fs.pipe(f"{bucket}/{key}", data)
    fs.pipe(f"{bucket}/in/notes.txt", b"not an image")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, data in enumerate(images[:5]):
            info = tarfile.TarInfo(f"m{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    fs.pipe(f"{bucket}/shards/s-000.tar", buf.getvalue())
    fs.pipe(f"{bucket}/secret/x.png", images[0])  # in the bucket, outside the allowed prefixes
    queue = f"captions-s3-{uuid.uuid4().hex[:6]}"
    roots = f"s3://{bucket}/in,s3://{bucket}/shards"  # no local root at all
    env = {
        **worker_env,
        **s3.env,
        "CAPTIONER_CAPTION_QUEUE": queue,
        "CAPTIONER_INTERACTIVE_QUEUE": f"{queue}-now",
        "CAPTIONER_ALLOWED_ROOTS": roots,
        "CAPTIONER_CONCURRENCY": "2",
    }
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    workers = [WorkerProcess(env, log=log).start() for log in logs]
    try:
        for w in workers:
            w.wait_ready()
        runner = CliRunner()
        result = runner.invoke(
            cli,
            [
                "enqueue",
                f"s3://{bucket}/in/",
                f"s3://{bucket}/shards/s-000.tar",
                f"s3://{bucket}/secret/x.png",
                "--chunk-size",
                "2",
                "--wait",
                "--json",
            ],
            env=env,
        )
        assert result.exit_code == 0, result.output
        job_id = json.loads(result.output.strip().splitlines()[-1])["job"]["id"]
        out = f"s3://{bucket}/out/{job_id}.jsonl"
        result = runner.invoke(cli, ["export", job_id, "-o", out], env=env)
        assert result.exit_code == 0, result.output
    finally:
        for w in workers:
            w.terminate()
    rows = [json.loads(line) for line in fs.cat(out.removeprefix("s3://")).decode().splitlines()]
    info = JobClient(settings_from(env)).status(job_id)
    want = {f"s3://{bucket}/{k}" for k in keys} | {f"s3://{bucket}/shards/s-000.tar#m{i}" for i in range(5)}
    by_ref = {r["ref"]: r for r in rows}
    assert len(rows) == len(by_ref) == info.total == info.ok + info.error  # every item once, every row counted
    assert {ref for ref, r in by_ref.items() if r["status"] == "ok"} == want and info.ok == len(want)
    assert by_ref[f"s3://{bucket}/secret/x.png"]["error_class"] == "forbidden"
    assert all(r["id"] == item_id(r["ref"]) for r in rows)
