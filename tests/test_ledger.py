"""The ledger's contract, run against both backends: the machine's real Redis and its real PostgreSQL."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from common.errors import InvalidMessage, InvalidReview, NotCaptioned, UnknownItem, UnknownJob
from common.messages import GenParams, ItemResult, ItemStatus, JobState, item_id
from ledger import ItemFilter, Ledger, RedisLedger
from tests.conftest import LEDGER_DB, PG_URL, redis_url

BASE = "/archive/photos/"


def refs(n: int, start: int = 0) -> list[str]:
    return [f"{BASE}2024/06/img-{i:05d}.jpg" for i in range(start, start + n)]


def ok(ref: str, caption: str = "a red circle on a white background", **kw: object) -> ItemResult:
    fields = {"model_version": "tiny@1", "params": GenParams(max_length=20), "finished_at": time.time(), **kw}
    return ItemResult(id=item_id(ref), ref=ref, status=ItemStatus.OK, caption=caption, **fields)  # type: ignore[arg-type]


def failed(ref: str, error_class: str = "decode_error", **kw: object) -> ItemResult:
    fields = {"model_version": "tiny@1", "params": GenParams(max_length=20), "error": "not an image", **kw}
    return ItemResult(id=item_id(ref), ref=ref, status=ItemStatus.ERROR, error_class=error_class, **fields)  # type: ignore[arg-type]


def new_job(ledger: Ledger, job_id: str, items: list[str]) -> None:
    ledger.open_job(job_id, "test", GenParams(max_length=20), base=BASE)
    ledger.add_items(job_id, [(item_id(r), r) for r in items])


def test_items_are_counted_once_and_unknown_ids_are_told_apart(ledger: Ledger) -> None:
    items = refs(6)
    assert ledger.open_job("j", "test", GenParams(), base=BASE) is True
    assert ledger.add_items("j", [(item_id(r), r) for r in items]) == 6
    assert ledger.add_items("j", [(item_id(r), r) for r in items[:3] + refs(2, 100)]) == 2
    assert ledger.job("j").total == 8
    status = ledger.statuses("j", [item_id(items[0]), "0123456789abcdef"])
    assert status == {item_id(items[0]): ItemStatus.PENDING, "0123456789abcdef": None}
    assert ledger.open_job("j", "test", GenParams()) is False  # reopened, not created


def test_a_caption_is_final_counters_follow_statuses_and_rows_for_other_items_are_refused(ledger: Ledger) -> None:
    items = refs(4)
    new_job(ledger, "j", items)
    first = ledger.record("j", [ok(items[0], "first caption"), failed(items[1]), ok(items[2], flags=["truncated"])])
    assert (first.changed, first.finished, first.refused) == (3, False, 0)
    # Redelivery: the same items again, with other outcomes, and an item the job never had.
    again = ledger.record("j", [ok(items[0], "second caption"), ok(items[1], "now it worked"), ok("/elsewhere/x.jpg")])
    assert (again.changed, again.refused) == (1, 1)  # the failure became a caption; the stranger was refused
    info = ledger.job("j")
    assert (info.total, info.ok, info.error, info.pending) == (4, 3, 0, 1)
    assert info.flags == {"truncated": 1}
    rows = {r["ref"]: r for r in ledger.iter_results("j")}
    assert rows[items[0]]["caption"] == "first caption"
    assert rows[items[1]]["caption"] == "now it worked"
    assert "/elsewhere/x.jpg" not in rows and ledger.statuses("j", [item_id("/elsewhere/x.jpg")]) == {
        item_id("/elsewhere/x.jpg"): None
    }
    assert [r for r, _ in ledger.iter_pending("j")] == [item_id(items[3])]


def test_rows_read_back_with_their_provenance_and_references_outside_the_base(ledger: Ledger) -> None:
    inside, outside = refs(1)[0], "https://images.example.org/cat.jpg"
    new_job(ledger, "j", [inside, outside])
    v2 = GenParams(max_length=30, num_beams=2, prompt="a photo of")
    ledger.record("j", [ok(inside, flags=["empty", "repetition"], attempts=2, reused=True)])
    ledger.record(
        "j", [failed(outside, "timeout", model_version="tiny@2", params=v2, transient=True, profile="fast:sdpa")]
    )
    rows = {r["ref"]: r for r in ledger.iter_results("j")}
    assert rows[inside] == {
        "id": item_id(inside),
        "ref": inside,
        "status": "ok",
        "caption": "a red circle on a white background",
        "flags": ["empty", "repetition"],
        "model_version": "tiny@1",
        "params": {"max_length": 20, "num_beams": 1},
        "attempts": 2,
        "reused": True,
        "finished_at": rows[inside]["finished_at"],
    }
    assert abs(rows[inside]["finished_at"] - time.time()) < 60
    assert rows[outside] == {
        "id": item_id(outside),
        "ref": outside,
        "status": "error",
        "error_class": "timeout",
        "error": "not an image",
        "model_version": "tiny@2",
        "params": {"max_length": 30, "num_beams": 2, "prompt": "a photo of"},
        "profile": "fast:sdpa",
        "attempts": 1,
        "transient": True,
    }


def test_the_job_finishes_once_not_while_open_nor_while_a_container_is_open(ledger: Ledger) -> None:
    items = refs(3)
    new_job(ledger, "j", items)
    assert ledger.add_containers("j", [("shard-0", '{"url": "s"}')]) == 1
    assert ledger.record("j", [ok(r) for r in items]).finished is False  # still open: the producer is adding
    assert ledger.seal("j") is False  # a container is not read yet
    assert ledger.job("j").containers == 1
    assert [c for c, _ in ledger.iter_containers("j")] == ["shard-0"]
    assert ledger.close_container("j", "shard-0") is True
    assert ledger.state("j") is JobState.DONE
    assert ledger.record("j", [ok(r) for r in items]).finished is False  # a redelivery never finishes it again
    assert ledger.job("j").finished is not None


def test_requeue_makes_failures_and_flagged_captions_pending_again_and_resets_attempts(ledger: Ledger) -> None:
    items = refs(4)
    new_job(ledger, "j", items)
    ids = [item_id(r) for r in items]
    ledger.begin_attempt("j", ids)
    ledger.record(
        "j", [failed(items[0]), ok(items[1], flags=["truncated"]), ok(items[2]), failed(items[3], "cancelled")]
    )
    assert sorted(r["id"] for r in ledger.iter_status("j", ItemStatus.ERROR)) == sorted(ids[0::3])
    assert ledger.requeue("j", ids) == 2  # the two failures; captions stay
    info = ledger.job("j")
    assert (info.ok, info.error, info.pending) == (2, 0, 2)
    assert ledger.statuses("j", ids[:1]) == {ids[0]: ItemStatus.PENDING}
    assert sorted(i for i, _ in ledger.iter_pending("j")) == sorted([ids[0], ids[3]])
    assert ledger.begin_attempt("j", ids[:1])[ids[0]].started == 1  # a fresh start
    assert list(ledger.iter_flagged("j")) == [(ids[1], items[1])]
    assert ledger.requeue("j", [ids[1], ids[2]], flagged=True) == 1
    assert ledger.job("j").flags == {} and ledger.job("j").ok == 1


def test_attempts_count_crashes_and_solo_runs(ledger: Ledger) -> None:
    items = refs(2)
    new_job(ledger, "j", items)
    a, b = (item_id(r) for r in items)
    assert ledger.begin_attempt("j", [a, b])[a].suspect is False
    assert ledger.attempts_open("j") == 2
    ledger.end_attempts("j", [b])  # b failed transiently and was sent again: not a crash
    second = ledger.begin_attempt("j", [a, b])
    assert second[a].suspect and not second[b].suspect  # a's first attempt never ended: its worker died
    ledger.begin_alone("j", a)
    assert ledger.begin_attempt("j", [a])[a].alone == 1
    ledger.record("j", [ok(items[0]), ok(items[1])])
    assert ledger.attempts_open("j") == 0


def test_review_corrections_and_marks_sit_beside_the_caption(ledger: Ledger) -> None:
    items = refs(3)
    new_job(ledger, "j", items)
    ledger.record("j", [ok(items[0]), failed(items[1])])
    a = item_id(items[0])
    row = ledger.set_correction("j", a, "  a blue square  ", "ann")
    assert (row["caption"], row["corrected"], row["reviewer"]) == (
        "a red circle on a white background",
        "a blue square",
        "ann",
    )
    assert ledger.set_mark("j", [a], "accepted", "bob") == 1 and ledger.set_mark("j", [a], "accepted", "bob") == 0
    row = ledger.item("j", a)
    assert row is not None and (row["corrected"], row["mark"], row["reviewer"]) == ("a blue square", "accepted", "bob")
    assert [r["id"] for r in ledger.reviewed("j")] == [a]
    exported = next(r for r in ledger.iter_results("j") if r["id"] == a)
    assert exported["corrected"] == "a blue square" and exported["caption"].startswith("a red circle")
    with pytest.raises(UnknownItem):
        ledger.set_correction("j", "0123456789abcdef", "x", "ann")
    with pytest.raises(NotCaptioned):
        ledger.set_correction("j", item_id(items[1]), "x", "ann")  # failed: nothing to correct
    assert ledger.set_mark("j", [item_id(items[2])], "accepted", "ann") == 0  # pending: nothing to mark
    with pytest.raises(UnknownItem):
        ledger.set_mark("j", [a, "0123456789abcdef"], None, "ann")  # one stranger refuses the whole call
    with pytest.raises(InvalidReview):
        ledger.set_correction("j", a, "x" * 2001, "ann")
    with pytest.raises(InvalidReview):
        ledger.set_mark("j", [a], "maybe", "ann")
    assert ledger.item("j", a)["corrected"] == "a blue square"  # type: ignore[index]  # refusals changed nothing
    row = ledger.clear_correction("j", a, "ann")
    assert "corrected" not in row and row["mark"] == "accepted"
    assert ledger.item("j", "0123456789abcdef") is None
    assert ledger.item("j", item_id(items[2])) == {"id": item_id(items[2]), "ref": items[2], "status": "pending"}
    with pytest.raises(UnknownJob):
        ledger.page("nope")


@pytest.mark.parametrize(
    ("filt", "expected"),
    [
        (ItemFilter(), 100),
        (ItemFilter(status=ItemStatus.ERROR), 10),
        (ItemFilter(error_class="timeout"), 4),
        (ItemFilter(status=ItemStatus.PENDING), 30),
        (ItemFilter(flag="any"), 12),
        (ItemFilter(flag="repetition"), 6),
        (ItemFilter(text="BLUE"), 20),
        (ItemFilter(model_version="tiny@2"), 15),
        (ItemFilter(corrected=True), 3),
        (ItemFilter(corrected=False, status=ItemStatus.OK), 57),
    ],
)
def test_pages_cover_each_matching_item_exactly_once(ledger: Ledger, filt: ItemFilter, expected: int) -> None:
    items = refs(100)
    new_job(ledger, "j", items)
    rows = []
    for i, ref in enumerate(items[:70]):
        if i < 10:
            rows.append(failed(ref, "timeout" if i < 4 else "decode_error"))
        else:
            flags = ["truncated"] if i % 10 == 1 else ["repetition"] if i % 10 == 2 else None
            version = "tiny@2" if 10 <= i < 25 else "tiny@1"
            rows.append(ok(ref, "a blue square" if i % 3 == 0 else "a red circle", flags=flags, model_version=version))
    ledger.record("j", rows)
    for ref in items[60:63]:
        ledger.set_correction("j", item_id(ref), "corrected", "ann")
    seen: list[str] = []
    cursor, pages = None, 0
    while True:
        page = ledger.page("j", cursor=cursor, limit=7, filt=filt)
        assert len(page.rows) <= 7 and all(filt.matches(r) for r in page.rows)
        seen += [r["id"] for r in page.rows]
        pages += 1
        cursor = page.cursor
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == expected


def test_locks_have_one_owner_and_lapse(ledger: Ledger) -> None:
    ledger.open_job("t", "train", None)
    assert ledger.try_lock("t", "a", 30) and ledger.try_lock("t", "a", 30)
    assert not ledger.try_lock("t", "b", 30) and ledger.locked("t")
    ledger.unlock("t", "b")  # not b's to release
    assert ledger.locked("t")
    ledger.unlock("t", "a")
    assert not ledger.locked("t") and ledger.try_lock("t", "b", 1)
    deadline = time.monotonic() + 10
    while ledger.locked("t") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ledger.try_lock("t", "c", 30), "a lapsed lock is free"


def test_job_ids_cannot_reach_other_keys(ledger: Ledger) -> None:
    for bad in ("a:src", "../x", "", "x" * 129, "job id", "-lead", "a..b"):
        with pytest.raises(InvalidMessage, match="is not valid"):
            ledger.open_job(bad, "x", GenParams())
    new_job(ledger, "a", refs(1))
    with pytest.raises(InvalidMessage):
        ledger.record("a:src", [ok(refs(1)[0])])


def test_fields_listing_expiry_and_reuse(ledger: Ledger) -> None:
    new_job(ledger, "old", refs(1))
    new_job(ledger, "new", refs(1))
    assert [j.id for j in ledger.jobs(10)][:2] == ["new", "old"]
    ledger.set_fields("new", progress={"step": 3}, result={"version": "v1"})
    assert ledger.get_field("new", "progress") == {"step": 3} and ledger.job("new").extra["result"] == {"version": "v1"}
    assert ledger.ttl("old") is None
    ledger.expire_job("old", 100)
    assert 90 < (ledger.ttl("old") or 0) <= 100
    assert ledger.reuse_get("tiny@1|k", [b"d1", b"d2"]) == {}
    ledger.reuse_put("tiny@1|k", {b"d1": ("a red circle", ["truncated"])}, ttl_s=60)
    assert ledger.reuse_get("tiny@1|k", [b"d1", b"d2"]) == {b"d1": ("a red circle", ["truncated"])}
    assert ledger.reuse_get("tiny@2|k", [b"d1"]) == {}


def test_both_backends_give_the_same_rows() -> None:
    """One job written to each backend reads back as identical rows (the export does not depend on the backend)."""
    from ledger.postgres import PostgresLedger

    client = redis.Redis.from_url(redis_url(LEDGER_DB))
    prefix = f"ledger_same_{uuid.uuid4().hex[:8]}"
    backends: list[Ledger] = [RedisLedger(client, prefix), PostgresLedger(PG_URL, prefix)]
    items = [*refs(20), "https://example.org/a.png"]
    stamp = round(time.time(), 1)
    rows = [
        ok(r, f"caption {i}", finished_at=stamp, flags=["truncated"] if i % 4 == 0 else None)
        for i, r in enumerate(items[:15])
    ]
    rows += [failed(r, finished_at=stamp) for r in items[15:]]
    out = []
    try:
        for led in backends:
            new_job(led, "same", items)
            led.record("same", rows)
            led.set_correction("same", item_id(items[3]), "fixed", "ann")
            out.append(sorted(led.iter_results("same"), key=lambda r: r["id"]))
        for redis_row, pg_row in zip(out[0], out[1], strict=True):
            # Both keep a tenth of a second (Redis as an offset from the job's creation).
            assert abs(redis_row.pop("finished_at") - pg_row.pop("finished_at")) <= 1
            assert abs(redis_row.pop("reviewed_at", 0) - pg_row.pop("reviewed_at", 0)) <= 1
        assert out[0] == out[1]
    finally:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        pg = backends[1]
        assert isinstance(pg, PostgresLedger)
        pg._run(f"DROP SCHEMA IF EXISTS {pg.schema} CASCADE")
        pg.close()


def test_a_training_run_is_a_typed_record_stored_as_the_job_fields_it_always_was(ledger: Ledger) -> None:
    from common.messages import JobKind, TrainOutcome, TrainRequest
    from ledger import TrainingRun, TrainResult

    req = TrainRequest(job_id="train-1", dataset="/data/shapes", config={"max_steps": 3}, promote=True)
    ledger.open_job("train-1", "train /data/shapes", None, kind=JobKind.TRAIN)
    assert ledger.training_run("train-1") == TrainingRun()
    ledger.update_training_run("train-1", TrainingRun(request=req, sent=100.5, started=None, result=None))
    ledger.update_training_run("train-1", TrainingRun(progress={"step": 2, "total_steps": 3, "loss": 0.5}))
    run = ledger.training_run("train-1")
    assert (run.request, run.sent, run.started, run.result) == (req, 100.5, None, None)
    # Fields not set in a record stay as stored; the stored shapes are the free-form ones of before.
    ledger.update_training_run("train-1", TrainingRun(started=101.0))
    assert ledger.get_field("train-1", "request") == req.model_dump() and ledger.get_field("train-1", "sent") == 100.5
    assert ledger.job("train-1").extra["progress"] == {"step": 2, "total_steps": 3, "loss": 0.5}
    done = TrainResult(job_id="train-1", status=TrainOutcome.DONE, version="v3", promoted=True, steps=None)
    ledger.update_training_run("train-1", TrainingRun(version="v3", result=done))
    assert ledger.job("train-1").extra["result"] == {
        "job_id": "train-1",
        "status": "done",
        "version": "v3",
        "promoted": True,
        "steps": None,
    }
    run = ledger.training_run("train-1")
    assert (run.started, run.version, run.result) == (101.0, "v3", done)
    # A record written by the free-form fields of before reads as the typed one.
    ledger.set_fields("train-1", result={"job_id": "train-1", "status": "failed", "error": "boom", "later": 1})
    result = ledger.training_run("train-1").result
    assert result is not None and (result.status, result.error) == (TrainOutcome.FAILED, "boom")


#: Strings PostgreSQL text and jsonb cannot hold as they are, and the escape character the PostgreSQL ledger uses.
HOSTILE_TEXT = ["\x00", "a\x00b", "\x00lead", "tail\x00", "\x10", "\x100", "\x10\x00\x10u0000", "\\u0000"]


def test_every_string_one_backend_holds_the_other_holds_and_reads_back_equal(ledger: Ledger) -> None:
    """NUL (a list line, a Parquet text column, a shard's .txt member), lone surrogates (file names that are not
    UTF-8) and the PostgreSQL ledger's own escape character, in every text the ledger keeps."""
    # A file name that is not UTF-8 reads as surrogate escapes: references and error messages hold them.
    items = [f"{BASE}{s}.jpg" for s in HOSTILE_TEXT] + [f"\x00{BASE}x.jpg", f"{BASE}\udcff.jpg", f"{BASE}plain.jpg"]
    job = "nul"
    ledger.open_job(
        job,
        "name\x00with\x10nul",
        GenParams(max_length=20, prompt="a\x00b"),
        {"webhook": "http://x/\x00", "k\x00": ["\x00"]},
        base=BASE,
    )
    assert ledger.add_items(job, [(item_id(r), r) for r in items]) == len(items)
    assert dict(ledger.iter_pending(job)) == {item_id(r): r for r in items}
    assert ledger.item(job, item_id(items[1])) == {"id": item_id(items[1]), "ref": items[1], "status": "pending"}
    rows = [
        ok(r, caption=f"{s} caption", extra={"txt": f"member {s}", f"col{s}": [s, {s: s}]})
        for r, s in zip(items, HOSTILE_TEXT, strict=False)
    ]
    rows += [failed(r, error=f"cannot open {r}", extra={"text": "\x00"}) for r in items[-3:-1]]
    assert ledger.record(job, rows).changed == len(rows)
    info = ledger.job(job)
    assert (info.name, info.extra["k\x00"], info.params and info.params.prompt) == (
        "name\x00with\x10nul",
        ["\x00"],
        "a\x00b",
    )
    back = {r["id"]: r for r in ledger.iter_results(job)}
    for row in rows:
        got = back[row.id]
        assert got["ref"] == row.ref and got.get("caption") == row.caption and got.get("error") == row.error
        assert got["extra"] == row.extra
    # A retried failure keeps its reference whole; so does the page a reviewer reads.
    assert ledger.requeue(job, [item_id(items[-3])]) == 1
    assert dict(ledger.iter_pending(job)) == {item_id(items[-3]): items[-3], item_id(items[-1]): items[-1]}
    page = ledger.page(job, limit=len(items))
    assert {r["id"]: r["ref"] for r in page.rows} == {item_id(r): r for r in items}
    ledger.set_fields(job, webhook_error="refused \x00", other={"a\x00": "\x10"})
    assert ledger.get_fields(job, ["webhook_error", "other"]) == {
        "webhook_error": "refused \x00",
        "other": {"a\x00": "\x10"},
    }
    assert ledger.job(job).extra["webhook_error"] == "refused \x00"
    ledger.reuse_put("v\x00|k", {b"d1": ("cap\x00tion", ["truncated"]), b"d2": ("\x10", ["\x10"])}, ttl_s=60)
    assert ledger.reuse_get("v\x00|k", [b"d1", b"d2"]) == {
        b"d1": ("cap\x00tion", ["truncated"]),
        b"d2": ("\x10", ["\x10"]),
    }
    assert ledger.try_lock(job, "host\x00:1", 30) and not ledger.try_lock(job, "host\x00:2", 30)
