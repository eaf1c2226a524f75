"""The ledger's review operations against both backends (the real Redis and PostgreSQL): cursor paging that covers
a job once, filters, bounded scans, corrections beside the model's caption, marks, and the named errors of bad
requests."""

from __future__ import annotations

import pytest

import ledger.records as ledger_module
from common.errors import InvalidReview, NotCaptioned, UnknownItem, UnknownJob
from common.messages import GenParams, ItemResult, ItemStatus, item_id
from ledger import MAX_CORRECTION_CHARS, ItemFilter, Ledger

JOB = "job-review"
N = 600  # past Redis's small-hash encoding (512 entries), so HSCAN really walks in steps


def _fill(ledger: Ledger, job: str = JOB, n: int = N) -> dict[str, dict[str, str]]:
    """A job of ``n`` items: every 10th failed (two classes), every 7th flagged, two model versions, every 13th
    cancelled, the last 20 pending. Returns {kind: {id: ref}}."""
    ledger.open_job(job, job, GenParams())
    refs = [f"/data/img_{i:05d}.jpg" for i in range(n)]
    ledger.add_items(job, [(item_id(r), r) for r in refs])
    kinds: dict[str, dict[str, str]] = {k: {} for k in ("ok", "error", "cancelled", "pending")}
    rows = []
    for i, ref in enumerate(refs):
        iid = item_id(ref)
        if i >= n - 20:
            kinds["pending"][iid] = ref
        elif i % 10 == 0:
            cls = "fetch_error" if i % 20 == 0 else "decode_error"
            rows.append(ItemResult(id=iid, ref=ref, status=ItemStatus.ERROR, error_class=cls, error="no"))
            kinds["error"][iid] = ref
        elif i % 13 == 0:
            rows.append(ItemResult(id=iid, ref=ref, status=ItemStatus.CANCELLED, error_class="cancelled"))
            kinds["cancelled"][iid] = ref
        else:
            caption = f"A Red Circle number {i}" if i % 3 == 0 else f"a blue square number {i}"
            flags = ["truncated"] if i % 7 == 0 else None
            version = "v-new" if i % 2 else "v-old"
            rows.append(
                ItemResult(id=iid, ref=ref, status=ItemStatus.OK, caption=caption, model_version=version, flags=flags)
            )
            kinds["ok"][iid] = ref
    ledger.record(job, rows)
    return kinds


def _walk(ledger: Ledger, filt: ItemFilter | None = None, limit: int = 7) -> tuple[list[dict], list[int]]:
    """Every page from the first to the end: (rows, page sizes)."""
    rows: list[dict] = []
    sizes: list[int] = []
    cursor = None
    while True:
        page = ledger.page(JOB, cursor=cursor, limit=limit, filt=filt or ItemFilter())
        rows += page.rows
        sizes.append(len(page.rows))
        if page.cursor is None:
            return rows, sizes
        cursor = page.cursor


def test_pages_cover_every_item_once_in_full_pages(ledger: Ledger) -> None:
    kinds = _fill(ledger)
    rows, sizes = _walk(ledger)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == N
    assert set(ids) == {i for k in kinds.values() for i in k}
    assert all(s == 7 for s in sizes[:-1]) and 1 <= sizes[-1] <= 7
    pending = [r for r in rows if r["status"] == "pending"]
    assert {r["id"]: r["ref"] for r in pending} == kinds["pending"]
    assert all(set(r) == {"id", "ref", "status"} for r in pending)


@pytest.mark.parametrize(
    ("filt", "expect"),
    [
        (ItemFilter(status=ItemStatus.ERROR), lambda r: r["status"] == "error"),
        (ItemFilter(status=ItemStatus.PENDING), lambda r: r["status"] == "pending"),
        (ItemFilter(error_class="decode_error"), lambda r: r.get("error_class") == "decode_error"),
        (ItemFilter(flag="any"), lambda r: bool(r.get("flags"))),
        (ItemFilter(flag="truncated"), lambda r: "truncated" in (r.get("flags") or ())),
        (ItemFilter(flag="repetition"), lambda r: False),
        (ItemFilter(model_version="v-old"), lambda r: r.get("model_version") == "v-old"),
        (ItemFilter(text="red CIRCLE"), lambda r: "red circle" in (r.get("caption") or "").lower()),
        (
            ItemFilter(status=ItemStatus.OK, model_version="v-new", flag="any"),
            lambda r: r.get("model_version") == "v-new" and bool(r.get("flags")),
        ),
    ],
)
def test_filters_return_exactly_the_matching_items(ledger: Ledger, filt: ItemFilter, expect) -> None:
    _fill(ledger)
    everything, _ = _walk(ledger, limit=50)
    want = {r["id"] for r in everything if expect(r)}
    rows, _ = _walk(ledger, filt, limit=5)
    assert [r["id"] for r in rows if r["id"] not in want] == []
    assert {r["id"] for r in rows} == want and len(rows) == len(want)


def test_a_correction_sits_beside_the_caption_and_every_reader_sees_it(ledger: Ledger) -> None:
    kinds = _fill(ledger)
    target = next(iter(kinds["ok"]))
    before = ledger.item(JOB, target)
    assert before is not None and "corrected" not in before
    row = ledger.set_correction(JOB, target, "  a <b>green</b> triangle  ", "ana")
    assert row["corrected"] == "a <b>green</b> triangle"  # trimmed, never interpreted
    assert row["caption"] == before["caption"] and row["reviewer"] == "ana" and row["reviewed_at"] > 0
    assert ledger.item(JOB, target) == row
    # A redelivered row for the item changes neither the caption nor the correction.
    again = ItemResult(id=target, ref=before["ref"], status=ItemStatus.OK, caption="other words")
    ledger.record(JOB, [again])
    assert ledger.item(JOB, target) == row
    exported = {r["id"]: r for r in ledger.iter_results(JOB)}
    assert exported[target]["corrected"] == "a <b>green</b> triangle" and exported[target]["reviewer"] == "ana"
    assert sum("corrected" in r for r in exported.values()) == 1
    # Filters see corrections: text search, corrected or not.
    assert [r["id"] for r in _walk(ledger, ItemFilter(text="GREEN"))[0]] == [target]
    assert [r["id"] for r in _walk(ledger, ItemFilter(corrected=True))[0]] == [target]
    uncorrected = _walk(ledger, ItemFilter(corrected=False), limit=50)[0]
    assert len(uncorrected) == N - 1 and target not in {r["id"] for r in uncorrected}
    cleared = ledger.clear_correction(JOB, target, "ana")
    assert cleared == before
    assert _walk(ledger, ItemFilter(corrected=True))[0] == []


def test_bad_review_requests_raise_named_errors_and_change_nothing(ledger: Ledger) -> None:
    kinds = _fill(ledger)
    ok, failed, pending = next(iter(kinds["ok"])), next(iter(kinds["error"])), next(iter(kinds["pending"]))
    ledger.set_correction(JOB, ok, "kept", "ana")
    with pytest.raises(InvalidReview, match="at most 2000 characters"):
        ledger.set_correction(JOB, ok, "x" * (MAX_CORRECTION_CHARS + 1), "ana")
    with pytest.raises(InvalidReview, match="cannot be empty"):
        ledger.set_correction(JOB, ok, "   ", "ana")
    with pytest.raises(NotCaptioned, match="no caption yet"):
        ledger.set_correction(JOB, pending, "text", "ana")
    with pytest.raises(NotCaptioned, match="no caption yet"):
        ledger.set_correction(JOB, failed, "text", "ana")
    with pytest.raises(UnknownItem, match="no item 'nope'"):
        ledger.set_correction(JOB, "nope", "text", "ana")
    with pytest.raises(UnknownJob):
        ledger.set_correction("job-missing", ok, "text", "ana")
    with pytest.raises(UnknownJob):
        ledger.page("job-missing")
    with pytest.raises(InvalidReview, match="bad page cursor"):
        ledger.page(JOB, cursor="12;drop")
    assert ledger.item(JOB, "nope") is None
    assert ledger.item(JOB, ok)["corrected"] == "kept"
    assert [r["id"] for r in ledger.reviewed(JOB)] == [ok]
    assert ledger.item(JOB, pending) == {"id": pending, "ref": kinds["pending"][pending], "status": "pending"}


def test_marks_in_bulk_count_changes_skip_uncaptioned_items_and_refuse_unknown_ids(ledger: Ledger) -> None:
    kinds = _fill(ledger)
    oks = list(kinds["ok"])[:5]
    failed = next(iter(kinds["error"]))
    assert ledger.set_mark(JOB, [*oks, failed], "accepted", "bo") == 5
    assert ledger.set_mark(JOB, oks, "accepted", "bo") == 0  # nothing new
    assert ledger.set_mark(JOB, oks[:2], "rejected", "cy") == 2
    with pytest.raises(UnknownItem):
        ledger.set_mark(JOB, [oks[2], "nope"], None, "cy")
    with pytest.raises(InvalidReview, match="accepted, rejected"):
        ledger.set_mark(JOB, oks, "maybe", "cy")
    marks = {r["id"]: (r["mark"], r["reviewer"]) for r in ledger.reviewed(JOB)}
    assert marks == {**{i: ("rejected", "cy") for i in oks[:2]}, **{i: ("accepted", "bo") for i in oks[2:]}}
    assert ledger.set_mark(JOB, oks, None, "cy") == 5
    assert list(ledger.reviewed(JOB)) == []
    assert "mark" not in ledger.item(JOB, oks[0])


def test_a_search_examines_a_bounded_number_of_items_per_page(ledger: Ledger, monkeypatch) -> None:
    monkeypatch.setattr(ledger_module, "PAGE_SCAN_BUDGET", 60)
    _fill(ledger)
    cursor, scanned = None, []
    while True:  # a search nothing matches: each call examines about the budget, then hands back a cursor
        page = ledger.page(JOB, cursor=cursor, limit=10, filt=ItemFilter(text="no caption says this"))
        assert page.rows == []
        scanned.append(page.scanned)
        if page.cursor is None:
            break
        cursor = page.cursor
    assert sum(scanned) == N - 20  # every captioned or failed item once; pending ones cannot hold the text
    assert len(scanned) >= N // 120 and max(scanned) <= 120, scanned
