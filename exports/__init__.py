"""Exports of a job's rows: tables (jsonl, csv, parquet), files by image (sidecar, metadata, kohya), WebDataset;
placing each whole, locally or in an object store. What callers use is named here."""

from exports.export import FORMATS, export_rows, export_to_store
from exports.rows import (
    FLAT_COLUMNS,
    ContainerReader,
    ExportSummary,
    caption_text,
    container_member,
    flatten_row,
    split_flags,
)
from exports.tables import READABLE_FORMATS, read_rows

__all__ = [
    "FLAT_COLUMNS",
    "FORMATS",
    "READABLE_FORMATS",
    "ContainerReader",
    "ExportSummary",
    "caption_text",
    "container_member",
    "export_rows",
    "export_to_store",
    "flatten_row",
    "read_rows",
    "split_flags",
]
