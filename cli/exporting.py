"""`captioner export`: a job's rows as files, in any format, locally or to an object store."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from common.errors import ConfigError
from common.messages import QUALITY_FLAGS, is_url
from exports import FORMATS, ContainerReader

if TYPE_CHECKING:  # the CLI imports these lazily, so `captioner --help` stays fast
    from common.settings import Settings
from cli.base import cli, client_of, json_option, settings_of


@cli.command()
@click.argument("job_id")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl", show_default=True)
@click.option(
    "--shard-size",
    type=click.IntRange(1, 10_000_000),
    default=10_000,
    show_default=True,
    help="WebDataset: samples per tar shard.",
)
@click.option(
    "--exclude-flags",
    multiple=True,
    type=click.Choice(QUALITY_FLAGS),
    help="Dataset formats: leave out captions with this flag (repeatable).",
)
@click.option("-o", "--output", help="Output file ('-' for stdout; default <job>.<format>).")
@click.option("--sidecar-ext", default=".txt", show_default=True, help="Extension of sidecar caption files.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an output file (or sidecar caption files) that exists; only "
    "a regular file is ever replaced (never a link, a device or a pipe).",
)
@click.option("--reviewed-only", is_flag=True, help="Only items a reviewer corrected or marked (captioner review).")
@json_option
@click.pass_context
def export(
    ctx: click.Context,
    job_id: str,
    fmt: str,
    shard_size: int,
    exclude_flags: tuple[str, ...],
    output: str | None,
    sidecar_ext: str,
    overwrite: bool,
    reviewed_only: bool,
    as_json: bool,
) -> None:
    """Write a job's results: JSONL, CSV, Parquet, caption files next to the images (sidecar), an imagefolder
    metadata.jsonl, WebDataset shards, or kohya-style metadata JSON. A reviewer's correction travels beside the
    model's caption, and is the caption the dataset formats write."""
    from exports import export_rows, export_to_store
    from media.objects import ObjectStore, is_object_uri
    from media.paths import LocalFiles

    settings = settings_of(ctx)
    client = client_of(ctx)
    rows = client.ledger.reviewed(job_id) if reviewed_only else client.results(job_id)
    local = LocalFiles.under(settings.allowed_roots, settings.max_image_bytes)  # the workers' rules, checked again
    store = ObjectStore.from_settings(settings)
    options: dict[str, Any] = {"shard_size": shard_size, "exclude_flags": exclude_flags, "local": local}
    if fmt == "webdataset":
        options["remote"] = _remote_reader(settings)
        options["containers"] = _container_reader(settings)
    out: Path | str | None
    if output and is_object_uri(output):
        summary = export_to_store(rows, fmt, output, store, overwrite=overwrite, **options)
        out = summary.location
    else:
        out = None if output == "-" else Path(output or _default_export_name(job_id, fmt))
        summary = export_rows(
            rows, fmt, None if fmt == "sidecar" else out, sidecar_ext=sidecar_ext, overwrite=overwrite, **options
        )
    data = {
        "job_id": job_id,
        "format": fmt,
        **{k: str(v) if isinstance(v, Path) else v for k, v in summary.__dict__.items()},
    }
    if as_json:
        click.echo(json.dumps(data, default=str))
    elif out is not None or fmt == "sidecar":
        where = "next to the images" if fmt == "sidecar" else str(out)
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(summary.skipped_by_reason.items()))
        click.echo(
            f"wrote {summary.rows_written} row(s) {where}"
            + (f", skipped {summary.skipped} ({reasons})" if summary.skipped else ""),
            err=True,
        )


def _remote_reader(settings: Settings) -> Callable[[str], bytes] | None:
    """What a webdataset export reads URLs and objects with: the workers' image policy (the URL guard, the allowed
    prefixes, the byte cap); None where the image stack is not installed (such rows are skipped as not_local)."""
    try:
        from media.images import ImagePolicy, fetch_url, read_object
    except ImportError:
        return None
    policy = ImagePolicy.from_settings(settings)

    def read(ref: str) -> bytes:
        return fetch_url(ref, policy) if is_url(ref) else read_object(ref, policy)

    return read


def _container_reader(settings: Settings) -> ContainerReader | None:
    """What a webdataset export reads shards, Parquet and Arrow files with, to repack their members: as a worker
    reads them (None where the worker's stack is not installed: such members are skipped as container_member)."""
    try:
        from media.containers import container_images
    except ImportError:
        return None
    return functools.partial(container_images, settings=settings)


def _default_export_name(job_id: str, fmt: str) -> str:
    """The file an export writes without -o, in the current directory: only a valid job id names it (no "/",
    no ".."), so an id from before ids were checked cannot send it elsewhere."""
    from common.messages import check_job_id

    try:
        check_job_id(job_id)
    except ValueError as exc:
        raise ConfigError(f"{exc}; it cannot name the export file: give one with -o") from None
    return {"metadata": "metadata.jsonl", "webdataset": f"{job_id}-shards", "kohya": f"{job_id}.kohya.json"}.get(
        fmt, f"{job_id}.{fmt}"
    )
