"""Several captions per image in the exports (jobs with tasks): a row's ``captions`` ({task name: caption}) as the
flat formats' ``caption_<name>`` columns, as WebDataset members ``<key>.<name>.txt``, and the one caption a
caption format writes when ``--task`` chooses it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Any

from common.messages import caption_of

#: Flat formats name a task's column ``caption_<name>``.
COLUMN_PREFIX = "caption_"


def task_columns(tasks: Sequence[str]) -> tuple[str, ...]:
    """The columns the flat formats (CSV, Parquet) add for these tasks, in order."""
    return tuple(COLUMN_PREFIX + name for name in tasks)


def task_cells(row: Mapping[str, Any], tasks: Sequence[str]) -> list[str | None]:
    """A row's caption of each task, in order (None for a task it has no caption of: an error row)."""
    captions = row.get("captions") or {}
    return [captions.get(name) for name in tasks]


def peek_tasks(rows: Iterable[Mapping[str, Any]]) -> tuple[list[str], Iterator[Mapping[str, Any]]]:
    """The task names of the first row (every row of a job has the same), and the rows, that one included."""
    it = iter(rows)
    first = next(it, None)
    if first is None:
        return [], it
    mapping = first.model_dump(mode="json") if hasattr(first, "model_dump") else first
    return list(mapping.get("captions") or ()), chain([first], it)


def task_caption(row: Mapping[str, Any], task: str | None) -> str | None:
    """The caption a caption format writes: the chosen task's (None when the row has none for it); without a task,
    or for the first task, the reviewer's correction when there is one (corrections are of ``caption``, the first
    task's), else the model's caption."""
    return caption_of(dict(row), task)


def task_members(row: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """A WebDataset sample's members for its tasks: (``<name>.txt``, caption), one per task (the sample's key and a
    dot go before each)."""
    return [(f"{name}.txt", str(text).encode()) for name, text in (row.get("captions") or {}).items()]
