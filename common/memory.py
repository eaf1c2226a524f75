"""How much memory this machine (or the container it runs in) gives a process: the figure budgets are held to."""

from __future__ import annotations

import os
from pathlib import Path

#: Where a container's memory limit is written (cgroup v2, then v1); "max" or a huge number means none.
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def machine_memory_bytes() -> int | None:
    """Physical memory, or the container's limit when that is lower; None where neither can be read."""
    try:
        physical: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = None
    limits = [n for n in (physical, *(_cgroup_limit(p) for p in _CGROUP_LIMITS)) if n]
    return min(limits) if limits else None


def _cgroup_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) < 1 << 60 else None
