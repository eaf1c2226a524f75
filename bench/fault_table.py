"""Turns the fault tests' figures (JSON lines from FAULT_REPORT) into the table of docs/faults.md."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HEADER = """# Faults: what happened, out of N

Each row is one fault test (tests/test_recovery.py, test_faults.py, test_redis_faults.py, test_retries.py,
test_training_queue.py, test_load.py) run against real processes: a real redis-server, real worker
processes, a tiny GIT. *lost*: items with no row; *duplicated*: extra rows for an item in the export (the
ledger is keyed by item id, so this must be 0); *attempted twice*: items whose message was delivered again
after the fault (work repeated, still one row); *reconciled*: items `captioner reconcile` sent again because
the broker lost their message (the BRPOP window of celery #7950); `-`: no job to count (the producer refused
to start one). Regenerate with `make fault-report` (about 8 minutes on 2 cores, the 100,000-item load included).

| fault | what happened | N | ok | lost | duplicated | attempted twice | reconciled |
| --- | --- | --- | --- | --- | --- | --- | --- |
"""


HOSTILE_SECTION = "<!-- hostile-input: begin -->"


def render(report: Path) -> str:
    rows = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    cols = ("n", "ok", "lost", "duplicated", "attempted_twice", "reconciled")
    lines = [
        f"| {r['fault']} | {r.get('happened') or '-'} | " + " | ".join(str(r.get(c, "-")) for c in cols) + " |"
        for r in rows
    ]
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    return HEADER + "\n".join(lines) + f"\n\nMeasured {stamp} on a 2-core CPU machine (`make fault-report`).\n"


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
