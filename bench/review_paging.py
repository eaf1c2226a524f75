"""Review paging on a large job: does a page cost the same on 1,000,000 items as on 10,000?

Fills a throwaway redis-server (LocalRedis) through the Ledger API only (add_items, record, set_correction, set_mark),
then times ``Ledger.page`` for the first page and for a later one (reached by following cursors), unfiltered and with
each kind of filter, on both jobs. A page walks the manifest from its cursor, so the ratio large/small should stay
near 1 whatever the job's size; a filtered page examines at most ``PAGE_SCAN_BUDGET`` items.

    python -m bench.review_paging                      # 1,000,000 against 10,000 items (about two minutes)
    python -m bench.review_paging --large 200000 --out /tmp/paging.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import redis

from common.messages import GenParams, ItemResult, ItemStatus, item_id
from ledger import PAGE_SCAN_BUDGET, ItemFilter, Ledger, RedisLedger
from producer.local import LocalRedis

CASES: dict[str, ItemFilter] = {
    "unfiltered": ItemFilter(),
    "status=error (1%)": ItemFilter(status=ItemStatus.ERROR),
    "flag=truncated (5%)": ItemFilter(flag="truncated"),
    "text search (0.1%)": ItemFilter(text="zebra"),
    "corrected only (100 items)": ItemFilter(corrected=True),
}


def fill(ledger: Ledger, job_id: str, n: int, batch: int = 5000) -> float:
    """A job of ``n`` captioned items through the Ledger API: 1% errors, 5% flagged, 0.1% mention a zebra, and
    100 reviewer corrections. Returns the seconds it took."""
    started = time.perf_counter()
    ledger.open_job(job_id, job_id, GenParams())
    for start in range(0, n, batch):
        refs = [f"/archive/2024/06/{i:08d}.jpg" for i in range(start, min(n, start + batch))]
        ledger.add_items(job_id, [(item_id(r), r) for r in refs])
        ledger.record(job_id, [_row(start + k, ref) for k, ref in enumerate(refs)])
    ledger.seal(job_id)
    for i in range(1, n, max(1, n // 100)):  # 1, 1 + n/100, ...: never a multiple of 100, so never an error row
        ref = f"/archive/2024/06/{i:08d}.jpg"
        ledger.set_correction(job_id, item_id(ref), f"a reviewed caption of photo {i}", "bench")
    return time.perf_counter() - started


def _row(i: int, ref: str) -> ItemResult:
    if i % 100 == 0:
        return ItemResult(id=item_id(ref), ref=ref, status=ItemStatus.ERROR, error_class="fetch_error", error="404")
    animal = "zebra" if i % 1000 == 7 else "horse"
    return ItemResult(
        id=item_id(ref),
        ref=ref,
        status=ItemStatus.OK,
        model_version="git-base@bench",
        caption=f"a brown {animal} standing in a field of tall grass, photo {i}",
        flags=["truncated"] if i % 20 == 3 else None,
        params=GenParams(max_length=30),
        timings={"load_ms": 3.1, "infer_ms": 40.2},
        finished_at=1.8e9 + i,
    )


def measure(
    ledger: Ledger, jobs: tuple[str, str], filt: ItemFilter, *, later: int, limit: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Per job: best-of-``repeats`` milliseconds of the first page and of request number ``later`` (cursors
    followed untimed; None when the walk ends before it), and the items each examined. The jobs take turns in every
    round, and each keeps its best: the machine is shared, and a burst of a neighbour's work must not decide."""
    start: dict[str, dict[str, str | None]] = {}
    for job in jobs:
        cursor = None
        for _ in range(later - 1):
            cursor = ledger.page(job, cursor=cursor, limit=limit, filt=filt).cursor
            if cursor is None:
                break
        start[job] = {"first": None, "later": cursor}
    out = {job: {"first_ms": None, "first_scanned": None, "later_ms": None, "later_scanned": None} for job in jobs}
    for _ in range(repeats):
        for job in jobs:
            for which, cursor in start[job].items():
                if which == "later" and cursor is None:
                    continue
                t = time.perf_counter()
                page = ledger.page(job, cursor=cursor, limit=limit, filt=filt)
                ms = 1000 * (time.perf_counter() - t)
                best = out[job][f"{which}_ms"]
                out[job][f"{which}_ms"] = ms if best is None else min(best, ms)
                out[job][f"{which}_scanned"] = page.scanned
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--limit", type=int, default=48, help="items per page (the page's default)")
    ap.add_argument("--later", type=int, default=20, help="which later request to time (cursors followed)")
    ap.add_argument("--repeats", type=int, default=7, help="rounds; each figure is the best of them")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = ap.parse_args(argv)
    with LocalRedis() as server:
        ledger = RedisLedger(redis.Redis.from_url(server.url(0)), "bench")
        fill_s = {"small": fill(ledger, "job-small", args.small), "large": fill(ledger, "job-large", args.large)}
        memory = int(ledger.r.info("memory")["used_memory"])
        results: dict[str, Any] = {}
        for name, filt in CASES.items():
            timed = measure(
                ledger, ("job-small", "job-large"), filt, later=args.later, limit=args.limit, repeats=args.repeats
            )
            small, large = timed["job-small"], timed["job-large"]
            # The small job's first page is the yardstick: a later page of the small job often does not exist (its
            # 100 errors fill three pages), and a page should cost the same wherever it lies in a job of any size.
            later = large["later_ms"] and large["later_ms"] / small["first_ms"]
            results[name] = {
                "small": small,
                "large": large,
                "ratio_first": large["first_ms"] / small["first_ms"],
                "ratio_later": later,
            }
    report = {
        "large": args.large,
        "small": args.small,
        "limit": args.limit,
        "later_page": args.later,
        "scan_budget": PAGE_SCAN_BUDGET,
        "fill_s": fill_s,
        "redis_used_memory": memory,
        "cases": results,
    }
    print(_table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


def _table(report: dict[str, Any]) -> str:
    small, large, later = f"{report['small']:,}", f"{report['large']:,}", report["later_page"]
    lines = [
        f"| filter | first page, {small} items | first page, {large} | request {later}, {large} | "
        f"ratio first | ratio request {later} | items examined: {small} / {large} first / "
        f"{large} request {later} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def num(value: float | None, spec: str, unit: str = "") -> str:
        return "-" if value is None else f"{value:{spec}}{unit}"

    for name, r in report["cases"].items():
        s, g = r["small"], r["large"]
        lines.append(
            f"| {name} | {num(s['first_ms'], '.1f', ' ms')} | {num(g['first_ms'], '.1f', ' ms')} | "
            f"{num(g['later_ms'], '.1f', ' ms')} | {num(r['ratio_first'], '.2f')} | "
            f"{num(r['ratio_later'], '.2f')} | "
            f"{s['first_scanned']:,} / {g['first_scanned']:,} / {num(g['later_scanned'], ',')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
