"""Containers through a real worker: WebDataset shards (local and over HTTP), Parquet row groups and 🤗 datasets on
disk, each read once; corrupt, oversized and truncated members become named rows and the worker keeps serving."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import cli
from common.messages import TASK_CAPTION_CONTAINER, ContainerSpec, item_id
from producer.jobs import JobClient
from producer.local import WorkerProcess
from tests.conftest import shape_files


def _images(root: Path, n: int, seed: int) -> list[bytes]:
    return [Path(p).read_bytes() for p in shape_files(root, "src", n, seed=seed)]


def _shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _enqueue(worker_env: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(cli, ["enqueue", *args, "--wait", "--json"], env=worker_env)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])["job"]["id"]


def _rows(client: JobClient, job_id: str) -> dict[str, dict]:
    return {row["ref"].rsplit("#", 1)[1]: row for row in client.results(job_id)}


def test_a_shard_is_read_once_and_a_bad_member_is_one_row(
    caption_worker: WorkerProcess, worker_env: dict[str, str], session_root: Path, client: JobClient
) -> None:
    folder = session_root / f"wds-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    good = _images(session_root, 5, seed=11)
    samples = [(f"s{i:03d}", {"png": data, "txt": f"alt text {i}".encode()}) for i, data in enumerate(good)]
    samples.insert(2, ("bad", {"jpg": b"\xff\xd8\xff not really a jpeg"}))
    samples.append(("huge", {"png": b"\0" * (32 * 1024 * 1024 + 1)}))  # over the worker's 32 MiB image cap
    samples.append(("textonly", {"txt": b"no image in this sample"}))  # not an item
    shard = _shard(folder / "shard-000000.tar", samples)
    job_id = _enqueue(worker_env, str(shard))
    info = client.status(job_id)
    rows = _rows(client, job_id)
    assert info.state.value == "done" and info.total == len(rows) == 7 and info.containers == 0
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {f"s{i:03d}" for i in range(5)}
    assert rows["bad"]["error_class"] == "decode_error" and rows["huge"]["error_class"] == "too_large"
    assert rows["s003"]["extra"] == {"txt": "alt text 3"} and rows["s003"]["ref"] == f"{shard}#s003"
    assert rows["s003"]["id"] == item_id(f"{shard}#s003")  # ids from shard and key: the same on every run
    # A redelivered message finds its container closed and does nothing; a resumed enqueue reads the shard again
    # and skips every captioned member.
    spec = ContainerSpec(kind="tar", ref=str(shard))
    client.app.send_task(
        TASK_CAPTION_CONTAINER,
        kwargs={"job_id": job_id, "container": spec.id, "params": info.params.model_dump()},
        queue=client.settings.caption_queue,
    )
    again = _enqueue(worker_env, str(shard))
    assert again == job_id
    after = _rows(client, job_id)
    captions = {k: r for k, r in rows.items() if r["status"] == "ok"}
    assert {k: r for k, r in after.items() if r["status"] == "ok"} == captions and client.status(job_id).total == 7
    assert {k: after[k]["error_class"] for k in ("bad", "huge")} == {"bad": "decode_error", "huge": "too_large"}
    log = caption_worker.log_tail(400)
    assert f"container job={job_id} id={spec.id} is not open; nothing to do" in log  # the redelivered message
    # The resumed read: the five captioned members skipped, only the two failures tried again.
    reads = [line for line in log.splitlines() if f"container job={job_id} ref=" in line]
    assert len(reads) == 2 and "ok=5 error=2 skipped=0" in reads[0] and "ok=0 error=2 skipped=5" in reads[1], reads


def test_a_truncated_shard_over_http_gives_rows_for_what_was_read_and_the_worker_serves_on(
    caption_worker: WorkerProcess, worker_env: dict[str, str], http_root, session_root: Path, client: JobClient
) -> None:
    base, folder = http_root
    good = _images(session_root, 6, seed=12)
    whole = _shard(folder / "whole-0.tar", [(f"k{i}", {"png": d}) for i, d in enumerate(good)]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        cut = tar.getmember("k3.png").offset_data + 10  # in the middle of the fourth member's bytes
    (folder / "cut.tar").write_bytes(whole[:cut])
    job_id = _enqueue(worker_env, f"{base}/cut.tar")
    rows = _rows(client, job_id)
    read = {k for k, r in rows.items() if r["status"] == "ok"}
    assert read == {"k0", "k1", "k2"} and set(rows) == read | {"*"}
    assert rows["*"]["error_class"] == "decode_error" and "after" in rows["*"]["error"]
    assert client.status(job_id).state.value == "done"
    # The same worker goes on: the whole shard, named by a brace range, is captioned.
    job_id = _enqueue(worker_env, f"{base}/whole-{{0..0}}.tar")
    assert {r["status"] for r in client.results(job_id)} == {"ok"} and client.status(job_id).total == 6


def _export_webdataset(worker_env: dict[str, str], job_id: str, out: Path, *extra: str) -> dict:
    result = CliRunner().invoke(
        cli, ["export", job_id, "--format", "webdataset", "-o", str(out), "--json", *extra], env=worker_env
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def _read_shards(folder: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for info in tar:
                key, _, ext = info.name.partition(".")
                member = tar.extractfile(info)
                assert member is not None and ext not in samples.setdefault(key, {})
                samples[key][ext] = member.read()
    return samples


def test_a_webdataset_export_repacks_the_members_of_shards_read_once_each(
    caption_worker: WorkerProcess,
    worker_env: dict[str, str],
    http_root,
    session_root: Path,
    tmp_path: Path,
    client: JobClient,
) -> None:
    base, www = http_root
    folder = session_root / f"wds-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    images = _images(session_root, 7, seed=13)
    local = [(f"a{i}", {"png": d, "txt": b"alt"}) for i, d in enumerate(images[:4])] + [
        ("bad", {"jpg": b"\xff\xd8 no"})
    ]
    _shard(folder / "a.tar", local)
    remote = _shard(www / "b.tar", [(f"b{i}", {"png": d}) for i, d in enumerate(images[4:])]).read_bytes()
    job_id = _enqueue(worker_env, str(folder / "a.tar"), f"{base}/b.tar")
    source = {key: parts for key, parts in local} | {f"b{i}": {"png": d} for i, d in enumerate(images[4:])}
    rows = _rows(client, job_id)
    assert client.status(job_id).ok == 7 and rows["bad"]["error_class"] == "decode_error"

    summary = _export_webdataset(worker_env, job_id, tmp_path / "out")
    assert (summary["rows_written"], summary["skipped_by_reason"]) == (7, {"not_ok": 1})
    samples = _read_shards(tmp_path / "out")
    assert set(samples) == {r["id"] for r in rows.values() if r["status"] == "ok"}
    for sample in samples.values():
        row = json.loads(sample["json"])
        key = row["ref"].rsplit("#", 1)[1]
        assert sample["png"] == source[key]["png"]  # the member's own bytes, repacked
        assert sample["txt"].decode() == row["caption"] == rows[key]["caption"]
    # The HTTP shard is cut short after captioning (in the middle of its second member): the first member is
    # packed, the two that can no longer be read are counted, and nothing else is lost.
    with tarfile.open(fileobj=io.BytesIO(remote)) as tar:
        cut = tar.getmember("b1.png").offset_data + 10
    (www / "b.tar").write_bytes(remote[:cut])
    summary = _export_webdataset(worker_env, job_id, tmp_path / "out", "--overwrite")
    assert (summary["rows_written"], summary["skipped_by_reason"]) == (5, {"not_ok": 1, "unreadable": 2})
    packed = {json.loads(s["json"])["ref"].rsplit("#", 1)[1] for s in _read_shards(tmp_path / "out").values()}
    assert packed == {"a0", "a1", "a2", "a3", "b0"}


def test_parquet_row_groups_carry_their_other_columns_to_the_export(
    caption_worker: WorkerProcess, worker_env: dict[str, str], session_root: Path, client: JobClient, tmp_path: Path
) -> None:
    good = _images(session_root, 5, seed=13)
    cells = [*good, b"corrupt cell", None]
    table = pa.table(
        {
            "image": pa.array(
                [None if c is None else {"bytes": c, "path": f"{i}.png"} for i, c in enumerate(cells)],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            "n": pa.array(range(7), pa.int64()),
            "meta": pa.array([{"w": i, "tags": ["a", str(i)]} for i in range(7)]),
            "thumb": pa.array([b"\x00\x01"] * 7, pa.binary()),
        }
    )
    path = session_root / f"set-{uuid.uuid4().hex[:6]}.parquet"
    pq.write_table(table, path, row_group_size=3)
    job_id = _enqueue(worker_env, str(path))
    rows = _rows(client, job_id)
    assert client.status(job_id).total == 7 and len(rows) == 7
    assert [rows[str(i)]["status"] for i in range(7)] == ["ok"] * 5 + ["error"] * 2
    assert rows["5"]["error_class"] == rows["6"]["error_class"] == "decode_error"
    assert rows["4"]["extra"] == {"n": 4, "meta": {"w": 4, "tags": ["a", "4"]}, "_omitted": ["thumb"]}
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(cli, ["export", job_id, "--format", "csv", "-o", str(out)], env=worker_env)
    assert result.exit_code == 0, result.output
    from exports import read_rows

    back = {r["ref"].rsplit("#", 1)[1]: r for r in read_rows(out, "csv")}
    assert json.loads(back["1"]["extra"])["meta"] == {"w": 1, "tags": ["a", "1"]}
    # As WebDataset samples: the file read once more, each captioned row's cell repacked under its image type.
    summary = _export_webdataset(worker_env, job_id, tmp_path / "shards")
    assert (summary["rows_written"], summary["skipped_by_reason"]) == (5, {"not_ok": 2})
    for sample in _read_shards(tmp_path / "shards").values():
        row = json.loads(sample.pop("json"))
        assert sample.pop("txt").decode() == row["caption"]
        [(ext, data)] = sample.items()
        assert data == good[int(row["ref"].rsplit("#", 1)[1])] and ext == "png"


def test_datasets_saved_to_disk_and_imagefolders_are_containers(
    caption_worker: WorkerProcess, worker_env: dict[str, str], session_root: Path, client: JobClient, tmp_path: Path
) -> None:
    datasets = pytest.importorskip("datasets")
    from training.synthetic import make_shapes

    folder = session_root / f"imgfolder-{uuid.uuid4().hex[:6]}"
    rows = make_shapes(folder, 6, seed=14, size=32)  # images and a metadata.jsonl with their captions
    saved = session_root / f"saved-{uuid.uuid4().hex[:6]}"
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "n": datasets.Value("int32")}
    )
    data = {
        "image": [{"bytes": p.read_bytes(), "path": None} for p, _ in rows],
        "text": [c for _, c in rows],
        "n": list(range(6)),
    }
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(saved))
    job_id = _enqueue(worker_env, str(saved))
    got = _rows(client, job_id)
    assert client.status(job_id).total == 6 and {r["status"] for r in got.values()} == {"ok"}
    assert sorted(r["extra"]["n"] for r in got.values()) == list(range(6))
    assert {r["extra"]["text"] for r in got.values()} == {c for _, c in rows}
    # save_to_disk wrote Arrow files: a WebDataset export repacks their rows' image bytes.
    summary = _export_webdataset(worker_env, job_id, tmp_path / "shards")
    assert (summary["rows_written"], summary["skipped_by_reason"]) == (6, {})
    packed = {json.loads(s["json"])["extra"]["n"]: s["png"] for s in _read_shards(tmp_path / "shards").values()}
    assert packed == {i: p.read_bytes() for i, (p, _) in enumerate(rows)}
    job_id = _enqueue(worker_env, str(folder), "--dataset")
    got = _rows(client, job_id)
    assert sorted(got) == sorted(p.name for p, _ in rows) and {r["status"] for r in got.values()} == {"ok"}
    assert {r["extra"]["text"] for r in got.values()} == {c for _, c in rows}
