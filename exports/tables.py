"""Every row, as a table: JSON Lines, CSV and Parquet writers, and the readers that stream them back."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from common.errors import ConfigError
from exports.captions import COLUMN_PREFIX, task_cells, task_columns
from exports.rows import FLAT_COLUMNS, INT_COLUMNS, Options, as_mapping, coerce, flatten_row

#: Formats a reader exists for (the caption formats hold captions only; a ``metadata.jsonl`` is plain JSON Lines and
#: reads back as its {"file_name", "text"} dicts with "jsonl").
READABLE_FORMATS = ("jsonl", "csv", "parquet")

#: First characters that make a spreadsheet take a cell for a formula (=, +, -, @), and tab and carriage return,
#: which some strip before looking.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def write_jsonl(rows: Iterable[Mapping[str, Any]], fh: IO[str], _opts: Options) -> int:
    count = 0
    for row in rows:
        fh.write(json.dumps(as_mapping(row), ensure_ascii=False, separators=(",", ":"), default=str))
        fh.write("\n")
        count += 1
    fh.flush()
    return count


def write_csv(rows: Iterable[Mapping[str, Any]], fh: IO[str], opts: Options) -> int:
    writer = csv.writer(fh, quoting=csv.QUOTE_MINIMAL)
    writer.writerow(FLAT_COLUMNS + task_columns(opts.tasks))
    count = 0
    for row in rows:
        flat = flatten_row(row)
        cells = [flat[name] for name in FLAT_COLUMNS] + task_cells(as_mapping(row), opts.tasks)
        writer.writerow(["" if value is None else _cell(value) for value in cells])
        count += 1
    fh.flush()
    return count


def _cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: a text cell starting like a formula gets a leading ``'`` (what
    OWASP advises for CSV injection). A cell of quotes before such a start gets one more, so that ``_uncell``
    gives back exactly the original."""
    if isinstance(value, str) and value.lstrip("'").startswith(_FORMULA_START):
        return "'" + value
    return value


def _uncell(value: str | None) -> str | None:
    """The text ``_cell`` was given."""
    if value and value.startswith("'") and value.lstrip("'").startswith(_FORMULA_START):
        return value[1:]
    return value


def _parquet_schema(tasks: tuple[str, ...] = ()) -> Any:
    import pyarrow as pa  # imported here: only Parquet needs it, and it is a heavy import for the CLI

    types = {name: pa.string() for name in FLAT_COLUMNS + task_columns(tasks)}
    types.update({name: pa.int32() for name in INT_COLUMNS})
    types["finished_at"] = types["reviewed_at"] = pa.float64()  # Unix seconds, as ItemResult records them
    return pa.schema([pa.field(name, kind, nullable=True) for name, kind in types.items()])


def write_parquet(rows: Iterable[Mapping[str, Any]], path: Path, opts: Options) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _parquet_schema(opts.tasks)
    count = 0
    with pq.ParquetWriter(str(path), schema, compression="zstd") as writer:
        columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        for row in rows:
            flat = flatten_row(row)
            flat.update(zip(task_columns(opts.tasks), task_cells(as_mapping(row), opts.tasks), strict=True))
            for name in schema.names:
                columns[name].append(flat[name])
            count += 1
            if len(columns["id"]) >= opts.batch_rows:
                writer.write_batch(pa.record_batch(list(columns.values()), schema=schema))
                columns = {name: [] for name in schema.names}
        if columns["id"] or count == 0:
            # An empty export still gets one (empty) batch so the file carries its schema.
            writer.write_batch(pa.record_batch(list(columns.values()), schema=schema))
    return count


def read_rows(path: Path | str, fmt: str) -> Iterator[dict[str, Any]]:
    """Stream rows back from an export: full rows for jsonl, ``FLAT_COLUMNS`` dicts for csv and parquet.

    Flat rows come back with the types ``flatten_row`` gives (int, float, str or None), so they compare
    equal to ``flatten_row(original)``. CSV cannot tell an empty string from None: both read as None.
    """
    if fmt not in READABLE_FORMATS:
        raise ConfigError(f"cannot read rows from format {fmt!r}; readable: {', '.join(READABLE_FORMATS)}")
    path = Path(path)
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt == "csv":
        return _read_csv(path)
    return _read_parquet(path)


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _read_csv(path: Path) -> Iterator[dict[str, Any]]:
    # Files written before a column existed (flags) read it as None.
    with open(path, encoding="utf-8", newline="") as fh:
        for record in csv.DictReader(fh):
            row = {name: coerce(name, _uncell(record.get(name)) or None) for name in FLAT_COLUMNS}
            row.update({k: _uncell(v) or None for k, v in record.items() if k.startswith(COLUMN_PREFIX)})
            yield row


def _read_parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    tasks = [name for name in parquet.schema_arrow.names if name.startswith(COLUMN_PREFIX)]
    present = [name for name in FLAT_COLUMNS if name in parquet.schema_arrow.names] + tasks
    missing = dict.fromkeys(name for name in FLAT_COLUMNS if name not in present)  # older files lack flags
    try:
        for batch in parquet.iter_batches(batch_size=10_000, columns=present):
            for record in batch.to_pylist():
                yield {name: record[name] if name in record else missing[name] for name in [*FLAT_COLUMNS, *tasks]}
    finally:
        parquet.close()
