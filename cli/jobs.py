"""`captioner enqueue`, `status`, `wait`, `jobs`, `retry`, `reconcile`, `failures`, `cancel`: caption jobs from
the command line."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from common.messages import QUALITY_FLAGS, GenParams, JobKind, is_url

if TYPE_CHECKING:  # the CLI imports these lazily, so `captioner --help` stays fast
    from common.settings import Settings
    from ledger import JobInfo
    from producer.jobs import JobClient
from cli.base import Fail, cli, client_of, emit, gen_params, job_id_option, json_option, settings_of, shown


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "--job-id",
    callback=job_id_option,
    help="Job id (default: derived from the sources and options, so a re-run resumes).",
)
@click.option("--name", help="A label shown by `captioner jobs`.")
@click.option("--column", help="Column holding image references in csv/jsonl/parquet lists.")
@click.option("--chunk-size", type=click.IntRange(1, 10_000), envvar="CAPTIONER_CHUNK_SIZE", help="Images per message.")
@click.option(
    "--max-length",
    type=click.IntRange(2, 512),
    help="Longest caption in tokens, the start token and the prompt included (default 50).",
)
@click.option("--num-beams", type=click.IntRange(1, 16), help="Beam search width (default 1: greedy).")
@click.option("--prompt", help="Text every caption starts with.")
@click.option("--follow-links", is_flag=True, help="Follow symlinked directories when walking.")
@click.option(
    "--sniff",
    is_flag=True,
    help="In directories, also take files without an image extension whose "
    "contents are an image (one small read each).",
)
@click.option("--on-done-task", metavar="TASK", help="Celery task sent with the job summary when the job ends.")
@click.option("--on-done-queue", metavar="QUEUE", help="Queue for --on-done-task (default: Celery's routing).")
@click.option("--webhook", metavar="URL", help="URL POSTed the signed job summary when the job ends.")
@click.option(
    "--dataset",
    "as_dataset",
    is_flag=True,
    help="Read each source with 🤗 datasets: an imagefolder or a "
    "hub id (streamed); save_to_disk folders are recognised without it.",
)
@click.option("--split", default="train", show_default=True, help="With --dataset: the split to caption.")
@click.option("--download", is_flag=True, help="With --dataset: download a hub dataset whole instead of streaming it.")
@click.option("--wait", "wait_", is_flag=True, help="Follow the job until it is done, with a progress bar.")
@json_option
@click.pass_context
def enqueue(
    ctx: click.Context,
    sources: tuple[str, ...],
    job_id: str | None,
    name: str | None,
    column: str | None,
    chunk_size: int | None,
    max_length: int | None,
    num_beams: int | None,
    prompt: str | None,
    follow_links: bool,
    sniff: bool,
    on_done_task: str | None,
    on_done_queue: str | None,
    webhook: str | None,
    as_dataset: bool,
    split: str,
    download: bool,
    wait_: bool,
    as_json: bool,
) -> None:
    """Create (or resume) a job from image files, directories, globs, URLs, object-store prefixes (s3://bucket/prefix/,
    listed recursively), URL/path lists, WebDataset shards (.tar, shard-{000..009}.tar), Parquet or Arrow files with
    an image-bytes column, and 🤗 datasets.

    Prints the job id. Running the same command again resumes the job: captioned items are skipped.
    """
    import itertools

    from media.objects import ObjectStore
    from producer.jobs import derive_job_id
    from producer.sources import Containers, check, expand

    settings = settings_of(ctx)
    opts = Containers(
        store=ObjectStore.from_settings(settings),
        dataset=as_dataset,
        split=split,
        download=download,
        per_part=settings.chunk_size,
    )
    for source in sources:  # every argument, before anything is written: a bad one leaves no half job
        check(source, column=column, containers=opts)
    params = gen_params(settings, max_length, num_beams, prompt)
    keys = [_source_key(s) for s in sources]
    job_id = job_id or derive_job_id([*keys, column or "", *(["dataset", split] if as_dataset else [])], params)
    refs = itertools.chain.from_iterable(
        expand(s, column=column, follow_links=follow_links, sniff=sniff, containers=opts) for s in sources
    )
    refs = _warn_roots(settings, refs)
    if webhook and not is_url(webhook):
        raise click.BadParameter("must be an http(s) URL", param_hint="--webhook")
    extra = {
        k: v
        for k, v in {
            "on_done_task": on_done_task,
            "on_done_queue": on_done_queue,
            "webhook": webhook,
            "column": column,
        }.items()
        if v
    }
    report = client_of(ctx).enqueue(
        refs,
        job_id=job_id,
        name=name or "",
        params=params,
        chunk_size=chunk_size,
        extra=extra or None,
        base=_common_folder(keys),
        on_hold=_say_held(settings),
    )
    if not as_json:
        click.echo(job_id)
        verb = "created" if report.created else "resumed"
        click.echo(
            f"{verb} job {job_id}: {report.items} item(s), {report.sent} queued, {report.skipped} already "
            f"captioned, {report.messages} message(s) in {report.seconds:.2f}s",
            err=True,
        )
    if wait_:
        info = follow_job(ctx, job_id, None, as_json)
        if as_json:
            click.echo(json.dumps({"enqueue": report.as_dict(), "job": info.as_dict()}))
    elif as_json:
        click.echo(json.dumps(report.as_dict()))


def _say_held(settings: Settings) -> Callable[[int], None]:
    def held(depth: int) -> None:
        limit = settings.max_queued_chunks
        text = f"the caption queue holds {depth} chunk(s), over CAPTIONER_MAX_QUEUED_CHUNKS={limit}: waiting"
        click.secho(text, err=True, fg="yellow")

    return held


def _source_key(source: str) -> str:
    """An argument as it names the job: URLs, objects and hub ids as given, paths made absolute."""
    from media.objects import is_object_uri

    if is_url(source) or is_object_uri(source) or not os.path.exists(os.path.expanduser(source)):
        return source
    return str(Path(source).expanduser().resolve())


def _common_folder(sources: list[str]) -> str | None:
    """The folder every directory argument lies in, or the one object prefix enqueued (the ledger stores references
    relative to it); None when another kind of source is given (the first reference's folder is used then)."""
    from media.objects import is_object_uri

    if len(sources) == 1 and is_object_uri(sources[0]) and not os.path.splitext(sources[0].rstrip("/"))[1]:
        return sources[0].rstrip("/") + "/"
    if not sources or not all(os.path.isdir(s) for s in sources):
        return None
    return os.path.join(os.path.commonpath(sources), "")


def _warn_roots(settings: Settings, refs: Iterable[Any]) -> Iterator[Any]:
    """Tell the user now, not after a million forbidden rows, when paths or objects fall outside the allowed roots."""
    roots = tuple(str(r).rstrip(os.sep) + os.sep for r in settings.allowed_roots)
    warned = False
    for item in refs:
        ref = getattr(item, "ref", item)  # a container's file is read by the same rules
        if (
            not warned
            and not ref.startswith(("http://", "https://", "hf:", *roots, *settings.allowed_prefixes))
            and ("://" in ref or os.path.isabs(ref))
        ):
            warned = True
            where = ", ".join([*map(str, settings.allowed_roots), *settings.allowed_prefixes]) or "none set"
            click.secho(
                f"warning: {ref} is outside CAPTIONER_ALLOWED_ROOTS ({where}); workers with the same "
                "settings will refuse it as 'forbidden'",
                err=True,
                fg="yellow",
            )
        yield item


# --- follow ----------------------------------------------------------------------------------------


def _print_status(info: JobInfo) -> None:
    click.echo(f"job        {shown(info.id)}  ({shown(info.name)})")
    click.echo(f"state      {info.state.value}")
    if info.kind is JobKind.TRAIN:
        _print_training(info)
        return
    click.echo(
        f"items      {info.total}: {info.ok} ok, {info.error} failed, {info.cancelled} cancelled, "
        f"{info.pending} pending"
    )
    p = info.params or GenParams()
    click.echo(f"params     max_length={p.max_length} num_beams={p.num_beams} prompt={p.prompt!r}")
    if info.flags:
        click.echo("flags      " + ", ".join(f"{n} {name}" for name, n in sorted(info.flags.items())))


def num(value: Any, spec: str = ".4f") -> str:
    """A number formatted, or "-" when it is missing (no loss before the first report, no ETA yet)."""
    return format(value, spec) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def metrics_text(metrics: dict[str, Any] | None, spec: str = ".4f") -> str:
    return "  ".join(f"{k}={num(v, spec)}" for k, v in (metrics or {}).items())


def progress_line(p: dict[str, Any], sep: str = "  ") -> str:
    step, total, epoch = num(p.get("step"), "d"), num(p.get("total_steps"), "d"), num(p.get("epoch"), ".2f")
    return sep.join(
        [f"{step}/{total}", f"epoch {epoch}", f"loss {num(p.get('loss'))}", f"eta {num(p.get('eta_s'), '.0f')}s"]
    )


def _print_training(info: JobInfo) -> None:
    p = info.extra.get("progress") or {}
    if p:
        click.echo(f"step       {progress_line(p)}")
        if p.get("metrics"):
            click.echo(f"eval       {metrics_text(p['metrics'])}  (step {num(p.get('metrics_step'), 'd')})")
        if p.get("tensorboard"):
            click.echo(f"tensorboard {p['tensorboard']}")
    result = info.extra.get("result") or {}
    if result.get("version"):
        note = "promoted" if result.get("promoted") else result.get("promotion")
        click.echo(f"version    {result['version']}" + (f"  ({note})" if note else ""))
    if result.get("error"):
        click.echo(f"error      {shown(result['error'])}")


@cli.command()
@click.argument("job_id")
@json_option
@click.pass_context
def status(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Counters and state of one job."""
    info = client_of(ctx).status(job_id)
    emit(as_json, info.as_dict(), lambda: _print_status(info))


def fail_if_failed(info: JobInfo) -> None:
    """A failed training job ends the command with exit 1 and its reason."""
    from common.messages import JobState

    if info.state is JobState.FAILED:
        reason = (info.extra.get("result") or {}).get("error") or "no reason recorded"
        raise Fail(f"job {info.id} failed: {reason}")


def train_ticker() -> Callable[[JobInfo], None]:
    """A line on stderr each time a training job reports a new step or evaluation."""
    seen: set[tuple[Any, Any]] = set()

    def tick(info: JobInfo) -> None:
        p = info.extra.get("progress") or {}
        if not p or (p.get("step"), p.get("metrics_step")) in seen:
            return
        seen.add((p.get("step"), p.get("metrics_step")))
        click.echo(f"step {progress_line(p, ' ')}  {metrics_text(p.get('metrics'), '.3f')}", err=True)

    return tick


def _stall_handler(client: JobClient, reconcile: bool) -> Callable[[JobInfo], None]:
    """What `wait` does when a job's last items have no message left anywhere: say so, or send them again."""

    def on_stall(info: JobInfo) -> None:
        if reconcile:
            n = client.reconcile(info.id)
            click.secho(f"job {info.id}: re-sent {n} item(s) whose messages the broker lost", err=True, fg="yellow")
        else:
            click.secho(
                f"warning: job {info.id} has {info.pending} pending item(s) and no message queued or in "
                f"flight: the broker lost them; run `captioner reconcile {info.id}` (or wait --reconcile)",
                err=True,
                fg="yellow",
            )

    return on_stall


def follow_job(
    ctx: click.Context, job_id: str, timeout: float | None, quiet: bool, reconcile: bool = False, stall_s: float = 30
) -> JobInfo:
    client = client_of(ctx)
    stall = {"on_stall": _stall_handler(client, reconcile), "stall_s": stall_s}
    if client.status(job_id).kind is JobKind.TRAIN:
        info = client.wait(job_id, timeout=timeout, on_tick=(lambda _: None) if quiet else train_ticker())
    elif quiet or not sys.stderr.isatty():
        info = client.wait(job_id, timeout=timeout, on_tick=lambda _: None, **stall)
    else:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(job_id, total=None, rate="")

            def tick(info: JobInfo) -> None:
                done = info.ok + info.error + info.cancelled
                speed = bar.tasks[0].speed
                bar.update(task, total=info.total, completed=done, rate=f"{speed:.1f} img/s" if speed else "")

            info = client.wait(job_id, timeout=timeout, on_tick=tick, **stall)
    if not quiet:
        _print_status(info)
    return info


@cli.command()
@click.argument("job_id")
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 1).")
@click.option("--strict", is_flag=True, help="Exit 1 when any item failed.")
@click.option(
    "--reconcile", is_flag=True, help="If the job stalls with no message left for its pending items, send them again."
)
@click.option(
    "--stall-after",
    type=click.FloatRange(1, 86_400),
    default=30,
    show_default=True,
    metavar="SECONDS",
    help="No progress this long, and nothing queued or in flight: the job has stalled.",
)
@json_option
@click.pass_context
def wait(
    ctx: click.Context,
    job_id: str,
    timeout: float | None,
    strict: bool,
    reconcile: bool,
    stall_after: float,
    as_json: bool,
) -> None:
    """Follow a job until every item is settled."""
    info = follow_job(ctx, job_id, timeout, as_json, reconcile, stall_after)
    if as_json:
        click.echo(json.dumps(info.as_dict()))
    fail_if_failed(info)
    if strict and info.error:
        raise Fail(f"{info.error} item(s) failed (captioner export {job_id} --format jsonl lists them)")


@cli.command()
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@json_option
@click.pass_context
def jobs(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Recent jobs, newest first."""
    infos = client_of(ctx).jobs(limit)

    def human() -> None:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table("job", "name", "state", "total", "ok", "failed", "pending", box=None)
        for i in infos:
            # Escaped twice: control characters for the terminal, [brackets] for rich's markup.
            table.add_row(
                escape(shown(i.id)),
                escape(shown(i.name)),
                i.state.value,
                str(i.total),
                str(i.ok),
                str(i.error),
                str(i.pending),
            )
        Console().print(table)

    emit(as_json, [i.as_dict() for i in infos], human)


# --- act -------------------------------------------------------------------------------------------


@cli.command()
@click.argument("job_id")
@click.option("--cancelled", "include_cancelled", is_flag=True, help="Re-queue cancelled items too.")
@click.option(
    "--flagged",
    "flagged",
    multiple=True,
    type=click.Choice(["any", *QUALITY_FLAGS]),
    help="Instead: caption again the captions with this quality flag (repeatable).",
)
@click.option("--max-length", type=click.IntRange(2, 512), help="Other parameters for this retry.")
@click.option("--num-beams", type=click.IntRange(1, 16))
@json_option
@click.pass_context
def retry(
    ctx: click.Context,
    job_id: str,
    include_cancelled: bool,
    flagged: tuple[str, ...],
    max_length: int | None,
    num_beams: int | None,
    as_json: bool,
) -> None:
    """Queue again only the items that failed (or, with --flagged, captions with quality flags)."""
    client = client_of(ctx)
    params = None
    if max_length or num_beams:
        old = client.status(job_id).params or GenParams()
        params = gen_params(settings_of(ctx), max_length or old.max_length, num_beams or old.num_beams, old.prompt)
    which = None if not flagged else frozenset(f for f in flagged if f != "any")
    n = client.retry(job_id, include_cancelled=include_cancelled, flagged=which, params=params)
    emit(as_json, {"job_id": job_id, "requeued": n}, lambda: click.echo(f"re-queued {n} item(s) of {job_id}"))


@cli.command()
@click.argument("job_id")
@json_option
@click.pass_context
def reconcile(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Compare a job's manifest with its ledger and re-queue items that have no result yet."""
    n = client_of(ctx).reconcile(job_id)
    emit(as_json, {"job_id": job_id, "requeued": n}, lambda: click.echo(f"re-queued {n} pending item(s) of {job_id}"))


@cli.command()
@click.argument("job_id")
@click.option("--limit", type=click.IntRange(0, 1_000_000), default=20, show_default=True, help="Items per class.")
@json_option
@click.pass_context
def failures(ctx: click.Context, job_id: str, limit: int, as_json: bool) -> None:
    """Failed items of a job, by error class, with their attempts."""
    groups = client_of(ctx).failures(job_id)

    def human() -> None:
        if not groups:
            click.echo(f"no failed items in {shown(job_id)}")
        for cls, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            click.echo(f"{shown(cls)}: {len(items)}")
            for it in items[:limit]:
                click.echo(f"  {shown(it['ref'])}  (attempts {it['attempts']}): {shown(it['error'])}")

    emit(as_json, groups, human)


@cli.command()
@click.argument("job_id")
@json_option
@click.pass_context
def cancel(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Stop a job: items not yet captioned are recorded as cancelled."""
    info = client_of(ctx).cancel(job_id)
    emit(as_json, info.as_dict(), lambda: click.echo(f"cancelled {job_id} ({info.pending} item(s) not captioned)"))
