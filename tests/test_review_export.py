"""Reviews travel with exports: every format carries the correction beside the model's caption, dataset formats
write the corrected text and leave rejected items out, and `captioner export --reviewed-only` writes only what a
reviewer touched."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner
from PIL import Image

from cli.main import cli
from common.messages import GenParams, ItemResult, ItemStatus, item_id
from exports import export_rows, read_rows
from ledger import Ledger, RedisLedger
from media.paths import LocalFiles
from tests.conftest import LEDGER_DB, redis_url

JOB = "job-reviewed"
PREFIX = "captioner-test"


@pytest.fixture
def job(tmp_path: Path) -> Iterator[tuple[Ledger, dict[str, str]]]:
    """Four captioned local images: one corrected, one rejected, one accepted, one left alone; {role: item id}."""
    client = redis.Redis.from_url(redis_url(LEDGER_DB))
    client.flushdb()
    ledger = RedisLedger(client, PREFIX)
    ledger.open_job(JOB, JOB, GenParams())
    roles = ("corrected", "rejected", "accepted", "untouched")
    refs = {}
    for n, role in enumerate(roles):
        path = tmp_path / "images" / f"{role}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (n * 60, 0, 0)).save(path)
        refs[role] = str(path)
    ledger.add_items(JOB, [(item_id(r), r) for r in refs.values()])
    ledger.record(
        JOB,
        [
            ItemResult(id=item_id(r), ref=r, status=ItemStatus.OK, caption=f"model says {role}")
            for role, r in refs.items()
        ],
    )
    ids = {role: item_id(r) for role, r in refs.items()}
    ledger.set_correction(JOB, ids["corrected"], 'a reviewer\'s words, "quoted", =1+1', "ana")
    ledger.set_mark(JOB, [ids["rejected"]], "rejected", "ana")
    ledger.set_mark(JOB, [ids["accepted"]], "accepted", "bo")
    yield ledger, ids
    client.close()


def test_flat_and_row_formats_carry_the_correction_beside_the_caption(job, tmp_path: Path) -> None:
    ledger, ids = job
    for fmt in ("jsonl", "csv", "parquet"):
        out = tmp_path / f"all.{fmt}"
        export_rows(ledger.iter_results(JOB), fmt, out)
        rows = {r["id"]: r for r in read_rows(out, fmt)}
        assert len(rows) == 4, fmt
        fixed = rows[ids["corrected"]]
        assert fixed["caption"] == "model says corrected", fmt
        assert fixed["corrected"] == 'a reviewer\'s words, "quoted", =1+1', fmt
        assert (fixed["reviewer"], rows[ids["rejected"]]["mark"], rows[ids["accepted"]]["reviewer"]) == (
            "ana",
            "rejected",
            "bo",
        ), fmt
        assert isinstance(fixed["reviewed_at"], float) and fixed["reviewed_at"] > 0, fmt
        assert rows[ids["untouched"]].get("corrected") is None and rows[ids["untouched"]].get("mark") is None


def test_dataset_formats_write_the_corrected_text_and_leave_rejected_items_out(job, tmp_path: Path) -> None:
    ledger, _ = job
    wanted = {
        "corrected.png": 'a reviewer\'s words, "quoted", =1+1',
        "accepted.png": "model says accepted",
        "untouched.png": "model says untouched",
    }
    summary = export_rows(ledger.iter_results(JOB), "metadata", tmp_path / "metadata.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert {Path(r["file_name"]).name: r["text"] for r in lines} == wanted
    assert summary.skipped_by_reason == {"rejected": 1}
    export_rows(ledger.iter_results(JOB), "kohya", tmp_path / "k.json")
    kohya = json.loads((tmp_path / "k.json").read_text())
    assert {Path(k).name: v["caption"] for k, v in kohya.items()} == wanted
    local = LocalFiles.under([tmp_path], 1 << 20)  # the images' folder, as the workers' allowed root
    export_rows(ledger.iter_results(JOB), "webdataset", tmp_path / "shards", local=local)
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        texts = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")}
    assert sorted(texts.values()) == sorted(wanted.values())
    export_rows(ledger.iter_results(JOB), "sidecar", None, local=local)
    images = tmp_path / "images"
    assert {p.name: p.read_text().strip() for p in images.glob("*.txt")} == {
        name.replace(".png", ".txt"): text for name, text in wanted.items()
    }


def test_cli_exports_the_reviewed_items_only(job, tmp_path: Path) -> None:
    _, ids = job
    env = {"CAPTIONER_BROKER_URL": redis_url(LEDGER_DB), "CAPTIONER_KEY_PREFIX": PREFIX}
    folder = tmp_path / "reviewed"
    folder.mkdir()
    result = CliRunner().invoke(
        cli,
        ["export", JOB, "--format", "metadata", "--reviewed-only", "-o", str(folder), "--json"],
        env=env,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["skipped_by_reason"] == {"rejected": 1}
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert sorted(Path(r["file_name"]).name for r in lines) == ["accepted.png", "corrected.png"]
    result = CliRunner().invoke(
        cli, ["export", JOB, "--format", "jsonl", "--reviewed-only", "-o", "-"], env=env, catch_exceptions=False
    )
    assert sorted(json.loads(line)["id"] for line in result.stdout.splitlines()) == sorted(
        ids[r] for r in ("corrected", "rejected", "accepted")
    )
    result = CliRunner().invoke(cli, ["export", "job-nope", "--reviewed-only", "-o", "-"], env=env)
    assert result.exit_code == 1 and "no job 'job-nope'" in result.stderr


def test_cli_refuses_outputs_that_are_not_regular_files_in_one_line(job, tmp_path: Path) -> None:
    env = {"CAPTIONER_BROKER_URL": redis_url(LEDGER_DB), "CAPTIONER_KEY_PREFIX": PREFIX}
    (tmp_path / "kept.jsonl").write_text("kept\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "kept.jsonl")
    # /dev/stdout without --overwrite only: a wrong implementation must not get the chance to replace it.
    for args in (["-o", "/dev/stdout"], ["-o", str(tmp_path / "link.jsonl"), "--overwrite"]):
        result = CliRunner().invoke(cli, ["export", JOB, *args], env=env)
        assert result.exit_code == 1 and "symbolic link" in result.stderr, result.output
        assert "overwrite" not in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "link.jsonl").is_symlink() and (tmp_path / "kept.jsonl").read_text() == "kept\n"
