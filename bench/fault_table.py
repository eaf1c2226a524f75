"""Turns the fault tests' figures (JSON lines from FAULT_REPORT) into the table of docs/faults.md."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HEADER = """# Faults: what happened, out of N

Each row is one fault test (tests/test_recovery.py, test_faults.py, test_redis_faults.py, test_retries.py,
test_training_queue.py, test_load.py) run against real processes: a real redis-server, real worker
processes, a tiny GIT. Every figure is one a bug could move. *lost*: items with no row; *counters off*: how far
the job's counters (`captioner status`) are from its exported rows (ok, failed and cancelled each against the
rows of that status, the total against the items; 0 when ok + failed + cancelled = total and each counter is
its rows); *captions replaced*: items captioned before the fault whose caption, model version or time changed
by the end (the ledger keeps the first caption, whatever is redelivered; `-`: no fault struck mid-job);
*attempted twice*: items whose message was delivered again after the fault (work repeated, still one row);
*reconciled*: items `captioner reconcile` sent again because the broker lost their message (the BRPOP window of
celery #7950); `-`: no job to count (the producer refused to start one). Regenerate with `make fault-report`
(about 8 minutes on 2 cores, the 100,000-item load included).

| fault | what happened | N | ok | lost | counters off | captions replaced | attempted twice | reconciled |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
"""

COLUMNS = ("n", "ok", "lost", "counters_off", "replaced", "attempted_twice", "reconciled")


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


HOSTILE_SECTION = "<!-- hostile-input: begin -->"


def render(report: Path) -> str:
    rows = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    lines = []
    for r in rows:
        # Figures of a row's own (a training fault's model versions, say) go with what happened, not lost.
        own = [f"{k}: {v}" for k, v in r.items() if k not in {"fault", "happened", *COLUMNS} and _scalar(v)]
        happened = (r.get("happened") or "-") + (f" ({', '.join(own)})" if own else "")
        lines.append(f"| {r['fault']} | {happened} | " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |")
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    return HEADER + "\n".join(lines) + f"\n\nMeasured {stamp} on a 2-core CPU machine (`make fault-report`).\n"


def _scalar(value: object) -> bool:
    return isinstance(value, int | float | str) and not isinstance(value, bool)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.fault_table REPORT.jsonl OUT.md", file=sys.stderr)
        return 2
    out = Path(argv[1])
    # The hostile-input section has its own figures and command (bench/hostile.py): kept as it is.
    kept = out.read_text().partition(HOSTILE_SECTION)[1:] if out.exists() else ("", "")
    out.write_text(render(Path(argv[0])) + ("\n" + "".join(kept) if kept[0] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
