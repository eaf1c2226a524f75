"""End to end through real parts: producer -> Redis -> a real worker process -> ledger -> export."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from common.errors import InvalidMessage
from common.messages import TASK_CAPTION, TASK_CAPTION_MANY, GenParams, ItemStatus, item_id
from producer.jobs import JobClient, workers_info
from runtime.celery_app import create_app
from tests.conftest import MAX_LENGTH, direct_captions

pytestmark = pytest.mark.usefixtures("caption_worker")


def run_job(client: JobClient, refs: list[str], job_id: str, **kw: object) -> list[dict]:
    client.enqueue(refs, job_id=job_id, **kw)
    info = client.wait(job_id, timeout=120, on_tick=lambda _: None)
    assert info.pending == 0
    return list(client.results(job_id))


def test_worker_batches_equal_direct_generate(client: JobClient, images: Path, tiny_model: Path) -> None:
    paths = sorted(images.glob("*.jpg"))
    rows = run_job(client, [str(p) for p in paths], "job-direct", chunk_size=4)
    assert len(rows) == len(paths)
    assert all(r["status"] == "ok" for r in rows), rows
    # Batched in the worker (chunks of 4 sharing batches of up to 16) == one by one in transformers.
    assert {r["ref"]: r["caption"] for r in rows} == direct_captions(tiny_model, paths)
    row = rows[0]
    assert row["params"] == {"max_length": MAX_LENGTH, "num_beams": 1}
    assert row["model_version"].startswith("tiny-git@")
    assert row["attempts"] == 1


def test_corrupt_files_get_their_error_and_the_rest_are_captioned(client: JobClient, images: Path) -> None:
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("this is not an image")
    good = next(images.glob("*.jpg")).read_bytes()
    (images / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (images / "notes.txt").write_text("not an image extension: never enqueued")
    report = client.enqueue([str(p) for p in sorted(images.iterdir()) if p.suffix == ".jpg"], job_id="job-corrupt")
    info = client.wait(report.job_id, timeout=120, on_tick=lambda _: None)
    rows = {Path(r["ref"]).name: r for r in client.results(report.job_id)}
    assert info.total == 13 and info.ok == 10 and info.error == 3
    assert rows["empty.jpg"]["error_class"] == "decode_error"
    assert rows["text.jpg"]["error_class"] == "decode_error"
    assert rows["truncated.jpg"]["error_class"] == "decode_error"
    assert all(rows[n]["status"] == "ok" for n in rows if n not in {"empty.jpg", "text.jpg", "truncated.jpg"})


def test_resume_skips_captioned_items(client: JobClient, images: Path, session_root: Path) -> None:
    refs = [str(p) for p in sorted(images.glob("*.jpg"))]
    first = client.enqueue(refs[:6], job_id="job-resume")
    client.wait("job-resume", timeout=120, on_tick=lambda _: None)
    before = {r["id"]: r["finished_at"] for r in client.results("job-resume")}
    again = client.enqueue(refs, job_id="job-resume")  # the same six plus four new ones
    info = client.wait("job-resume", timeout=120, on_tick=lambda _: None)
    assert (first.created, first.sent) == (True, 6)
    assert (again.created, again.skipped, again.sent, again.new) == (False, 6, 4, 4)
    after = {r["id"]: r["finished_at"] for r in client.results("job-resume")}
    assert info.total == 10 and info.ok == 10
    assert all(after[i] == t for i, t in before.items())  # the first six were not captioned again


def test_forbidden_paths_fail_alone_and_retry_requeues_only_failures(
    client: JobClient, images: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.jpg"  # not under the worker's allowed root
    shutil.copy(next(images.glob("*.jpg")), outside)
    refs = [str(p) for p in sorted(images.glob("*.jpg"))] + [str(outside)]
    rows = run_job(client, refs, "job-forbidden")
    bad = [r for r in rows if r["status"] != "ok"]
    assert [(r["ref"], r["error_class"]) for r in bad] == [(str(outside), "forbidden")]
    assert client.retry("job-forbidden") == 1
    info = client.wait("job-forbidden", timeout=60, on_tick=lambda _: None)
    assert (info.ok, info.error) == (10, 1)


def test_cancel_records_queued_items_as_cancelled_and_enqueue_reopens(client: JobClient, images: Path) -> None:
    refs = {item_id(p): p for p in map(str, sorted(images.glob("*.jpg")))}
    client.ledger.open_job("job-cancel", "c", GenParams(max_length=MAX_LENGTH))
    client.ledger.add_items("job-cancel", refs.items())
    client.ledger.seal("job-cancel")
    client.cancel("job-cancel")
    client._send("job-cancel", refs, GenParams(max_length=MAX_LENGTH))  # a chunk still queued at cancel time
    info = client.wait("job-cancel", timeout=60, on_tick=lambda _: None)
    assert (info.state.value, info.cancelled, info.ok, info.pending) == ("cancelled", 10, 0, 0)
    again = client.enqueue(list(refs.values()), job_id="job-cancel")  # re-running the enqueue resumes it
    info = client.wait("job-cancel", timeout=60, on_tick=lambda _: None)
    assert again.sent == 10
    assert (info.state.value, info.cancelled, info.ok) == ("done", 0, 10)


def test_parameters_the_model_cannot_run_are_engine_error_rows(settings, images: Path, tmp_path: Path) -> None:
    """A max_length past the model's positions: the engine refuses every batch, each item is tried alone, then
    recorded as engine_error (not transient: the same model refuses again), and the job ends with them as
    failures. Through the real service, engine and ledger; parameters a model of GenParams' range refuses never
    reach one (they are refused at the edge), so the model here has fewer positions than max_length asks."""
    from common.messages import ChunkMessage
    from ledger import ledger_from_settings
    from model.engine import CaptionEngine, EngineConfig
    from training.tiny import build_random_git, tiny_git_config
    from worker.chunks import ChunkRunner
    from worker.service import CaptionService

    config = tiny_git_config()
    config.max_position_embeddings = 16
    model = build_random_git(tmp_path / "short-git", config)
    service = CaptionService(
        settings,
        engine_factory=lambda: CaptionEngine.load(EngineConfig(model=str(model), device="cpu", dtype="float32")),
    )
    ledger = ledger_from_settings(settings)
    refs = [str(p) for p in sorted(images.glob("*.jpg"))[:3]]
    ledger.open_job("job-engine-error", "engine error", GenParams(max_length=20))
    ledger.add_items("job-engine-error", [(item_id(r), r) for r in refs])
    ledger.seal("job-engine-error")
    try:
        ChunkRunner(service, ledger, settings).run(
            ChunkMessage(job_id="job-engine-error", items=refs, params=GenParams(max_length=20))
        )
    finally:
        service.close()
    rows = list(ledger.iter_results("job-engine-error"))
    assert [(r["status"], r["error_class"], r.get("transient")) for r in rows] == [("error", "engine_error", None)] * 3
    assert all("max_length 20 exceeds the model's 16 positions" in r["error"] for r in rows)
    info = ledger.job("job-engine-error")
    assert (info.state.value, info.ok, info.error) == ("done", 0, 3)
    assert {r["error_class"] for r in ledger.iter_status("job-engine-error", ItemStatus.ERROR)} == {"engine_error"}


def test_service_single_image_by_task_name(settings, images: Path, http_root, tiny_model: Path) -> None:
    """A service with only a task name and JSON: a path, a URL and inline base64, in and out."""
    app = create_app(settings)
    path = sorted(images.glob("*.jpg"))[0]
    base, www = http_root
    shutil.copy(path, www / "a.jpg")
    expected = direct_captions(tiny_model, [path])[str(path)]
    by_path = app.send_task(TASK_CAPTION, kwargs={"source": str(path)}).get(timeout=60)
    by_url = app.send_task(TASK_CAPTION, kwargs={"source": {"url": f"{base}/a.jpg"}}).get(timeout=60)
    b64 = base64.b64encode(path.read_bytes()).decode()
    by_b64 = app.send_task(TASK_CAPTION, kwargs={"source": {"b64": b64}}).get(timeout=60)
    for result in (by_path, by_url, by_b64):
        assert result["status"] == "ok", result
        assert result["caption"] == expected
    missing = app.send_task(TASK_CAPTION, args=[f"{base}/missing.jpg"]).get(timeout=60)
    assert (missing["status"], missing["error_class"]) == ("error", "fetch_error")


def test_a_single_call_overtakes_a_bulk_backlog(settings, client: JobClient, images: Path) -> None:
    """A service's one image goes to the interactive queue, which workers take from first: it is answered while an
    archive's chunks are still queued, not after them."""
    paths = [str(p) for p in sorted(images.glob("*.jpg"))]
    bulk = []  # 300 items: copies of the ten files
    for i in range(30):
        for p in paths:
            bulk.append(str(shutil.copy(p, images / f"copy-{i}-{Path(p).name}")))
    client.enqueue(bulk, job_id="job-backlog", chunk_size=4)
    row = create_app(settings).send_task(TASK_CAPTION, kwargs={"source": paths[0]}).get(timeout=60)
    backlog = client.status("job-backlog")
    assert row["status"] == "ok"
    assert backlog.pending > len(bulk) // 2, f"the single call waited for the backlog ({backlog.pending} pending)"
    client.wait("job-backlog", timeout=180, on_tick=lambda _: None)


def test_service_bulk_by_list_keeps_order(settings, images: Path) -> None:
    app = create_app(settings)
    paths = [str(p) for p in sorted(images.glob("*.jpg"))]
    sources = [*paths[:3], {"path": "/etc/passwd"}, paths[3]]
    rows = app.send_task(TASK_CAPTION_MANY, kwargs={"sources": sources}).get(timeout=60)
    assert [r["ref"] for r in rows] == [*paths[:3], "/etc/passwd", paths[3]]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error", "ok"]
    assert rows[3]["error_class"] == "forbidden"


def test_single_requests_from_many_callers_share_batches(settings, images: Path, caption_worker) -> None:
    app = create_app(settings)
    paths = [str(p) for p in sorted(images.glob("*.jpg"))]
    before = workers_info(app)
    results = [app.send_task(TASK_CAPTION, args=[p]) for p in paths]
    rows = [r.get(timeout=60) for r in results]
    after = workers_info(app)
    assert all(r["status"] == "ok" for r in rows)
    b, a = before[caption_worker.name], after[caption_worker.name]  # other workers may share the broker DB
    assert a["items"] - b["items"] == len(paths)
    assert a["batches"] - b["batches"] < len(paths), "single-image messages were never batched together"
    assert a["model_version"].startswith("tiny-git@") and a["loaded"]


def test_celery_call_cli_by_task_name(settings, images: Path, worker_env: dict[str, str]) -> None:
    path = str(sorted(images.glob("*.jpg"))[0])
    env = {**worker_env, "PATH": str(Path(sys.executable).parent)}
    out = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.celery_app", "call", TASK_CAPTION, "--args", json.dumps([path])],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    task_id = out.stdout.strip().splitlines()[-1]
    row = create_app(settings).AsyncResult(task_id).get(timeout=60)
    assert row["status"] == "ok" and row["ref"] == path


def test_bad_message_is_rejected_with_a_clear_error(settings) -> None:
    app = create_app(settings)
    result = app.send_task(TASK_CAPTION, kwargs={"source": {"path": "/x", "url": "http://y"}})
    with pytest.raises(InvalidMessage, match="exactly one of"):
        result.get(timeout=30)
    result = app.send_task(TASK_CAPTION, kwargs={"source": "/x", "colour": "red"})
    with pytest.raises(InvalidMessage, match="colour"):
        result.get(timeout=30)


def test_ledger_keys_never_expire_by_default(client: JobClient, images: Path, settings) -> None:
    run_job(client, [str(next(images.glob("*.jpg")))], "job-ttl")
    r = redis.Redis.from_url(settings.redis_url_str)
    keys = r.keys(f"{settings.key_prefix}:*")
    assert keys and all(r.ttl(k) == -1 for k in keys)


def test_quality_flags_are_counted_and_flagged_items_can_be_captioned_again(client: JobClient, images: Path) -> None:
    refs = [str(p) for p in sorted(images.glob("*.jpg"))]
    rows = run_job(client, refs, "job-flags", params=GenParams(max_length=6))
    truncated = {r["id"] for r in rows if "truncated" in (r.get("flags") or [])}
    info = client.status("job-flags")
    # A random tiny GIT rarely ends a caption within 6 tokens: most captions are cut at the limit.
    assert truncated and info.flags.get("truncated") == len(truncated)
    n = client.retry("job-flags", flagged=frozenset({"truncated"}), params=GenParams(max_length=9))
    info = client.wait("job-flags", timeout=60, on_tick=lambda _: None)
    again = {r["id"]: r for r in client.results("job-flags")}
    assert n == len(truncated) and info.ok == 10
    assert all(again[i]["params"]["max_length"] == 9 for i in truncated)
    assert all(again[i]["params"]["max_length"] == 6 for i in again if i not in truncated)


def test_a_cpu_model_decodes_beside_its_batches_one_image_at_a_time_while_fetches_overlap(
    settings, images: Path, tiny_model: Path
) -> None:
    """Where the model runs on the CPU its threads use every core, so by default one image decodes beside a running
    batch (more decoders preempt the model's threads); fetching still runs on every decode thread at once, and the
    service's decodes and batches go through its gate."""
    import threading

    from common.messages import Source
    from model.engine import CaptionEngine, EngineConfig
    from tests.conftest import image_server
    from worker.service import CaptionService

    together = threading.Barrier(3, timeout=2.5)  # three fetches in flight at once, or none is answered

    def answer(path: str) -> bool:
        try:
            together.wait()
        except threading.BrokenBarrierError:
            return False
        return True

    own = settings.model_copy(update={"decode_threads": 4, "decode_concurrency": 0})
    service = CaptionService(
        own,
        engine_factory=lambda: CaptionEngine.load(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32")),
    )
    # What the gate saw: decodes counted while preprocessing, and batches marked while generating.
    engine, seen = service.engine, {"decoding": [], "generating": []}
    prepare, generate = engine.prepare, engine.generate_detailed

    def watched_prepare(batch: list) -> object:
        seen["decoding"].append(service.gate.active)
        return prepare(batch)

    def watched_generate(*args: object, **kwargs: object) -> object:
        seen["generating"].append(service.gate.generating)
        return generate(*args, **kwargs)

    engine.prepare = watched_prepare  # type: ignore[method-assign]
    engine.generate_detailed = watched_generate  # type: ignore[method-assign]
    try:
        assert (service.decode_slots(), service.gate.while_generating, service.gate.idle) == (1, 1, 4)
        with image_server(sorted(images.glob("*.jpg"))[0].read_bytes(), answer) as base:
            sources = [Source(url=f"{base}/{i}.jpg") for i in range(3)]
            rows = service.caption_sources(sources, GenParams(max_length=8))
    finally:
        service.close()
    assert [r.status for r in rows] == [ItemStatus.OK] * 3, [r.error for r in rows]
    assert len(seen["decoding"]) == 3 and all(n >= 1 for n in seen["decoding"])
    assert seen["generating"] and all(seen["generating"])
    chosen = CaptionService(settings.model_copy(update={"decode_concurrency": 3}), engine_factory=lambda: engine)
    try:
        assert chosen.decode_slots() == 3
    finally:
        chosen.close()
