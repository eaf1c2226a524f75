"""The ``captioner`` command line: enqueue and follow jobs, export results, start workers. Never imports torch.

A user's mistake is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from common.errors import CaptionerError, ConfigError
from common.messages import QUALITY_FLAGS, GenParams, JobKind, is_url
from producer.export import FORMATS, ContainerReader

if TYPE_CHECKING:  # the CLI imports these lazily, so `captioner --help` stays fast
    from common.ledger import JobInfo
    from common.settings import Settings
    from common.store import ModelStore
    from producer.jobs import JobClient

EXIT_ERROR = 1


class _Group(click.Group):
    """Turns the errors a user can cause into one clear line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except BrokenPipeError:  # `captioner export ... -o - | head`: the reader left, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None
        except CaptionerError as exc:
            raise _Fail(f"{exc}") from None
        except OSError as exc:  # an export target not writable, a disk full: the user's environment, not a bug
            where = f"{exc.filename}: " if exc.filename else ""
            raise _Fail(f"{where}{exc.strerror or exc}") from None
        except Exception as exc:
            message = _infra_message(exc)
            if message is None:
                raise
            raise _Fail(message) from None


class _Fail(click.ClickException):
    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.secho(f"error: {self.format_message()}", err=True, fg="red")


def _infra_message(exc: Exception) -> str | None:
    """Broker and settings failures, said plainly; None for anything that is a bug."""
    import redis
    from kombu.exceptions import OperationalError
    from pydantic import ValidationError

    if isinstance(exc, redis.exceptions.ResponseError) and "OOM" in str(exc):
        return f"Redis is out of memory (maxmemory reached); nothing more was written: {exc}"
    if isinstance(exc, redis.RedisError | OperationalError | ConnectionError):
        return f"cannot reach Redis: {exc} (check CAPTIONER_BROKER_URL / CAPTIONER_REDIS_URL)"
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"bad setting {'.'.join(map(str, first['loc']))}: {first['msg']}"
    return None


@dataclass
class CliState:
    """What every command shares: the settings, and a job client made on first use (so --help and `config` never
    touch the broker)."""

    settings: Settings
    _client: JobClient | None = None

    @property
    def client(self) -> JobClient:
        if self._client is None:
            from producer.jobs import JobClient

            self._client = JobClient(self.settings)
        return self._client


def _state(ctx: click.Context) -> CliState:
    state = ctx.find_root().obj
    assert isinstance(state, CliState), "the cli group sets its state before any command runs"
    return state


def _settings(ctx: click.Context) -> Settings:
    return _state(ctx).settings


def _client(ctx: click.Context) -> JobClient:
    return _state(ctx).client


def _emit(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    if as_json:
        click.echo(_json_text(data))
    else:
        human()


def _json_text(data: Any) -> str:
    """JSON with text readable as it is, except what a terminal may act on: C0 controls (JSON escapes them), and C1
    controls (U+009B opens an escape sequence on 8-bit terminals), separators and format characters (bidi
    overrides), which JSON would leave raw and are written as ``\\uXXXX`` escapes of the same text."""
    text = json.dumps(data, ensure_ascii=False, default=str)
    return "".join(ch if ch.isascii() or ch.isprintable() else json.dumps(ch)[1:-1] for ch in text)


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")


def _shown(text: object) -> str:
    """Text from the ledger as a terminal should show it: job names, ids, references and error messages are
    anyone's input, so control and format characters (escape sequences, bidi overrides) print as escapes."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--broker-url", envvar="CAPTIONER_BROKER_URL", help="Celery broker (redis://...).")
@click.option("--redis-url", envvar="CAPTIONER_REDIS_URL", help="Ledger Redis; defaults to the broker.")
@click.option("--key-prefix", envvar="CAPTIONER_KEY_PREFIX", help="Prefix of every ledger key.")
@click.pass_context
def cli(ctx: click.Context, broker_url: str | None, redis_url: str | None, key_prefix: str | None) -> None:
    """Caption very large image archives with a GIT model on a Celery + Redis queue."""
    from pydantic import ValidationError

    from common.settings import Settings, use_settings

    overrides = {"broker_url": broker_url, "redis_url": redis_url, "key_prefix": key_prefix}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v})
    except ValidationError as exc:
        raise _Fail(_infra_message(exc) or str(exc)) from None
    except ConfigError as exc:
        raise _Fail(str(exc)) from None
    use_settings(settings)
    ctx.obj = CliState(settings)


# --- enqueue ---------------------------------------------------------------------------------------


def _gen_params(settings: Settings, max_length: int | None, num_beams: int | None, prompt: str | None) -> GenParams:
    from pydantic import ValidationError

    try:
        return GenParams(
            max_length=max_length or settings.max_length, num_beams=num_beams or settings.num_beams, prompt=prompt
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        # A field's own error names it; one about the fields together (no room for a caption) names both.
        where = first["loc"][0] if first["loc"] else "max_length/--prompt"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise click.BadParameter(message, param_hint=f"--{str(where).replace('_', '-')}") from None


def _job_id_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A --job-id the worker will accept, or a usage error now (before anything is written)."""
    from common.messages import check_job_id

    try:
        return None if value is None else check_job_id(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--job-id", callback=_job_id_option,
              help="Job id (default: derived from the sources and options, so a re-run resumes).")  # fmt: skip
@click.option("--name", help="A label shown by `captioner jobs`.")
@click.option("--column", help="Column holding image references in csv/jsonl/parquet lists.")
@click.option("--chunk-size", type=click.IntRange(1, 10_000), envvar="CAPTIONER_CHUNK_SIZE", help="Images per message.")
@click.option("--max-length", type=click.IntRange(2, 512), help="Longest caption in tokens, the start token and the "
              "prompt included (default 50).")  # fmt: skip
@click.option("--num-beams", type=click.IntRange(1, 16), help="Beam search width (default 1: greedy).")
@click.option("--prompt", help="Text every caption starts with.")
@click.option("--follow-links", is_flag=True, help="Follow symlinked directories when walking.")
@click.option("--sniff", is_flag=True, help="In directories, also take files without an image extension whose "
              "contents are an image (one small read each).")  # fmt: skip
@click.option("--on-done-task", metavar="TASK", help="Celery task sent with the job summary when the job ends.")
@click.option("--on-done-queue", metavar="QUEUE", help="Queue for --on-done-task (default: Celery's routing).")
@click.option("--webhook", metavar="URL", help="URL POSTed the signed job summary when the job ends.")
@click.option("--dataset", "as_dataset", is_flag=True, help="Read each source with 🤗 datasets: an imagefolder or a "
              "hub id (streamed); save_to_disk folders are recognised without it.")  # fmt: skip
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

    from common.objects import ObjectStore
    from producer.jobs import derive_job_id
    from producer.sources import Containers, check, expand

    settings = _settings(ctx)
    opts = Containers(store=ObjectStore.from_settings(settings), dataset=as_dataset, split=split, download=download,
                      per_part=settings.chunk_size)  # fmt: skip
    for source in sources:  # every argument, before anything is written: a bad one leaves no half job
        check(source, column=column, containers=opts)
    params = _gen_params(settings, max_length, num_beams, prompt)
    keys = [_source_key(s) for s in sources]
    job_id = job_id or derive_job_id([*keys, column or "", *(["dataset", split] if as_dataset else [])], params)
    refs = itertools.chain.from_iterable(
        expand(s, column=column, follow_links=follow_links, sniff=sniff, containers=opts) for s in sources
    )
    refs = _warn_roots(settings, refs)
    if webhook and not is_url(webhook):
        raise click.BadParameter("must be an http(s) URL", param_hint="--webhook")
    extra = {k: v for k, v in {"on_done_task": on_done_task, "on_done_queue": on_done_queue,
                               "webhook": webhook, "column": column}.items() if v}  # fmt: skip
    report = _client(ctx).enqueue(
        refs, job_id=job_id, name=name or "", params=params, chunk_size=chunk_size, extra=extra or None,
        base=_common_folder(keys), on_hold=_say_held(settings),
    )  # fmt: skip
    if not as_json:
        click.echo(job_id)
        verb = "created" if report.created else "resumed"
        click.echo(
            f"{verb} job {job_id}: {report.items} item(s), {report.sent} queued, {report.skipped} already "
            f"captioned, {report.messages} message(s) in {report.seconds:.2f}s",
            err=True,
        )
    if wait_:
        info = _wait(ctx, job_id, None, as_json)
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
    from common.objects import is_object_uri

    if is_url(source) or is_object_uri(source) or not os.path.exists(os.path.expanduser(source)):
        return source
    return str(Path(source).expanduser().resolve())


def _common_folder(sources: list[str]) -> str | None:
    """The folder every directory argument lies in, or the one object prefix enqueued (the ledger stores references
    relative to it); None when another kind of source is given (the first reference's folder is used then)."""
    from common.objects import is_object_uri

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
    click.echo(f"job        {_shown(info.id)}  ({_shown(info.name)})")
    click.echo(f"state      {info.state.value}")
    if info.kind is JobKind.TRAIN:
        _print_training(info)
        return
    click.echo(f"items      {info.total}: {info.ok} ok, {info.error} failed, {info.cancelled} cancelled, "
               f"{info.pending} pending")  # fmt: skip
    p = info.params or GenParams()
    click.echo(f"params     max_length={p.max_length} num_beams={p.num_beams} prompt={p.prompt!r}")
    if info.flags:
        click.echo("flags      " + ", ".join(f"{n} {name}" for name, n in sorted(info.flags.items())))


def _num(value: Any, spec: str = ".4f") -> str:
    """A number formatted, or "-" when it is missing (no loss before the first report, no ETA yet)."""
    return format(value, spec) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _metrics_text(metrics: dict[str, Any] | None, spec: str = ".4f") -> str:
    return "  ".join(f"{k}={_num(v, spec)}" for k, v in (metrics or {}).items())


def _progress_line(p: dict[str, Any], sep: str = "  ") -> str:
    step, total, epoch = _num(p.get("step"), "d"), _num(p.get("total_steps"), "d"), _num(p.get("epoch"), ".2f")
    return sep.join(
        [f"{step}/{total}", f"epoch {epoch}", f"loss {_num(p.get('loss'))}", f"eta {_num(p.get('eta_s'), '.0f')}s"]
    )


def _print_training(info: JobInfo) -> None:
    p = info.extra.get("progress") or {}
    if p:
        click.echo(f"step       {_progress_line(p)}")
        if p.get("metrics"):
            click.echo(f"eval       {_metrics_text(p['metrics'])}  (step {_num(p.get('metrics_step'), 'd')})")
        if p.get("tensorboard"):
            click.echo(f"tensorboard {p['tensorboard']}")
    result = info.extra.get("result") or {}
    if result.get("version"):
        note = "promoted" if result.get("promoted") else result.get("promotion")
        click.echo(f"version    {result['version']}" + (f"  ({note})" if note else ""))
    if result.get("error"):
        click.echo(f"error      {_shown(result['error'])}")


@cli.command()
@click.argument("job_id")
@json_option
@click.pass_context
def status(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Counters and state of one job."""
    info = _client(ctx).status(job_id)
    _emit(as_json, info.as_dict(), lambda: _print_status(info))


def _stall_handler(client: JobClient, reconcile: bool) -> Callable[[JobInfo], None]:
    """What `wait` does when a job's last items have no message left anywhere: say so, or send them again."""

    def on_stall(info: JobInfo) -> None:
        if reconcile:
            n = client.reconcile(info.id)
            click.secho(f"job {info.id}: re-sent {n} item(s) whose messages the broker lost", err=True, fg="yellow")
        else:
            click.secho(f"warning: job {info.id} has {info.pending} pending item(s) and no message queued or in "
                        f"flight: the broker lost them; run `captioner reconcile {info.id}` (or wait --reconcile)",
                        err=True, fg="yellow")  # fmt: skip

    return on_stall


def _wait(
    ctx: click.Context, job_id: str, timeout: float | None, quiet: bool, reconcile: bool = False, stall_s: float = 30
) -> JobInfo:
    client = _client(ctx)
    stall = {"on_stall": _stall_handler(client, reconcile), "stall_s": stall_s}
    if client.status(job_id).kind is JobKind.TRAIN:
        info = client.wait(job_id, timeout=timeout, on_tick=(lambda _: None) if quiet else _train_ticker())
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
@click.option("--reconcile", is_flag=True,
              help="If the job stalls with no message left for its pending items, send them again.")  # fmt: skip
@click.option("--stall-after", type=click.FloatRange(1, 86_400), default=30, show_default=True, metavar="SECONDS",
              help="No progress this long, and nothing queued or in flight: the job has stalled.")  # fmt: skip
@json_option
@click.pass_context
def wait(ctx: click.Context, job_id: str, timeout: float | None, strict: bool, reconcile: bool, stall_after: float,
         as_json: bool) -> None:  # fmt: skip
    """Follow a job until every item is settled."""
    info = _wait(ctx, job_id, timeout, as_json, reconcile, stall_after)
    if as_json:
        click.echo(json.dumps(info.as_dict()))
    _fail_if_failed(info)
    if strict and info.error:
        raise _Fail(f"{info.error} item(s) failed (captioner export {job_id} --format jsonl lists them)")


@cli.command()
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@json_option
@click.pass_context
def jobs(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Recent jobs, newest first."""
    infos = _client(ctx).jobs(limit)

    def human() -> None:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table("job", "name", "state", "total", "ok", "failed", "pending", box=None)
        for i in infos:
            # Escaped twice: control characters for the terminal, [brackets] for rich's markup.
            table.add_row(escape(_shown(i.id)), escape(_shown(i.name)), i.state.value, str(i.total), str(i.ok),
                          str(i.error), str(i.pending))  # fmt: skip
        Console().print(table)

    _emit(as_json, [i.as_dict() for i in infos], human)


# --- act -------------------------------------------------------------------------------------------


@cli.command()
@click.argument("job_id")
@click.option("--cancelled", "include_cancelled", is_flag=True, help="Re-queue cancelled items too.")
@click.option("--flagged", "flagged", multiple=True, type=click.Choice(["any", *QUALITY_FLAGS]),
              help="Instead: caption again the captions with this quality flag (repeatable).")  # fmt: skip
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
    client = _client(ctx)
    params = None
    if max_length or num_beams:
        old = client.status(job_id).params or GenParams()
        params = _gen_params(_settings(ctx), max_length or old.max_length, num_beams or old.num_beams, old.prompt)
    which = None if not flagged else frozenset(f for f in flagged if f != "any")
    n = client.retry(job_id, include_cancelled=include_cancelled, flagged=which, params=params)
    _emit(as_json, {"job_id": job_id, "requeued": n}, lambda: click.echo(f"re-queued {n} item(s) of {job_id}"))


@cli.command()
@click.argument("job_id")
@json_option
@click.pass_context
def reconcile(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Compare a job's manifest with its ledger and re-queue items that have no result yet."""
    n = _client(ctx).reconcile(job_id)
    _emit(as_json, {"job_id": job_id, "requeued": n}, lambda: click.echo(f"re-queued {n} pending item(s) of {job_id}"))


@cli.command()
@click.argument("job_id")
@click.option("--limit", type=click.IntRange(0, 1_000_000), default=20, show_default=True, help="Items per class.")
@json_option
@click.pass_context
def failures(ctx: click.Context, job_id: str, limit: int, as_json: bool) -> None:
    """Failed items of a job, by error class, with their attempts."""
    groups = _client(ctx).failures(job_id)

    def human() -> None:
        if not groups:
            click.echo(f"no failed items in {_shown(job_id)}")
        for cls, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            click.echo(f"{_shown(cls)}: {len(items)}")
            for it in items[:limit]:
                click.echo(f"  {_shown(it['ref'])}  (attempts {it['attempts']}): {_shown(it['error'])}")

    _emit(as_json, groups, human)


@cli.command()
@click.argument("job_id")
@json_option
@click.pass_context
def cancel(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Stop a job: items not yet captioned are recorded as cancelled."""
    info = _client(ctx).cancel(job_id)
    _emit(as_json, info.as_dict(), lambda: click.echo(f"cancelled {job_id} ({info.pending} item(s) not captioned)"))


@cli.command()
@click.argument("job_id")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl", show_default=True)
@click.option("--shard-size", type=click.IntRange(1, 10_000_000), default=10_000, show_default=True,
              help="WebDataset: samples per tar shard.")  # fmt: skip
@click.option("--exclude-flags", multiple=True, type=click.Choice(QUALITY_FLAGS),
              help="Dataset formats: leave out captions with this flag (repeatable).")  # fmt: skip
@click.option("-o", "--output", help="Output file ('-' for stdout; default <job>.<format>).")
@click.option("--sidecar-ext", default=".txt", show_default=True, help="Extension of sidecar caption files.")
@click.option("--overwrite", is_flag=True, help="Replace an output file (or sidecar caption files) that exists.")
@click.option("--reviewed-only", is_flag=True,
              help="Only items a reviewer corrected or marked (captioner review).")  # fmt: skip
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
    from common.objects import ObjectStore, is_object_uri
    from common.paths import LocalFiles
    from producer.export import export_rows, export_to_store

    settings = _settings(ctx)
    client = _client(ctx)
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
        summary = export_rows(rows, fmt, None if fmt == "sidecar" else out, sidecar_ext=sidecar_ext,
                              overwrite=overwrite, **options)  # fmt: skip
    data = {"job_id": job_id, "format": fmt, **{k: str(v) if isinstance(v, Path) else v
                                                for k, v in summary.__dict__.items()}}  # fmt: skip
    if as_json:
        click.echo(json.dumps(data, default=str))
    elif out is not None or fmt == "sidecar":
        where = "next to the images" if fmt == "sidecar" else str(out)
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(summary.skipped_by_reason.items()))
        click.echo(f"wrote {summary.rows_written} row(s) {where}" +
                   (f", skipped {summary.skipped} ({reasons})" if summary.skipped else ""), err=True)  # fmt: skip


# --- training and models ---------------------------------------------------------------------------


def _fail_if_failed(info: JobInfo) -> None:
    """A failed training job ends the command with exit 1 and its reason."""
    from common.messages import JobState

    if info.state is JobState.FAILED:
        reason = (info.extra.get("result") or {}).get("error") or "no reason recorded"
        raise _Fail(f"job {info.id} failed: {reason}")


def _store(ctx: click.Context) -> ModelStore:
    from common.store import ModelStore

    root = _settings(ctx).model_store
    if root is None:
        raise _Fail("set CAPTIONER_MODEL_STORE to the model store directory")
    return ModelStore(root)


@cli.command()
@click.argument("dataset")
@click.option("--job-id", callback=_job_id_option, help="Job id (default: a new one).")
@click.option("--base-model", help="Hub id or directory to start from (default microsoft/git-base).")
@click.option("--epochs", "--num-train-epochs", "epochs", type=click.IntRange(1, 100_000))
@click.option("--max-steps", type=click.IntRange(1, 10_000_000), help="Stop after this many optimizer steps.")
@click.option("--learning-rate", type=click.FloatRange(0, 1, min_open=True))
@click.option("--batch-size", "--per-device-train-batch-size", "batch_size", type=click.IntRange(1, 4096),
              help="Images per forward pass and process.")  # fmt: skip
@click.option("--eval-steps", type=click.IntRange(1, 10_000_000))
@click.option("--num-processes", type=click.IntRange(1, 1024),
              help="Processes of a distributed run on the training worker (its GPUs, else CPU processes).")  # fmt: skip
@click.option("--report-to", type=click.Choice(["none", "tensorboard"]), help="tensorboard: event files in the run.")
@click.option("--lora-r", type=click.IntRange(0, 4096), help="Train LoRA adapters of this rank (peft) instead.")
@click.option("--column", help="Image column of a manifest or dataset.")
@click.option("--text-column", help="Caption column of a manifest or dataset.")
@click.option("--download", is_flag=True, help="Hub datasets: download whole (cached) instead of streaming.")
@click.option("--set", "settings_", metavar="KEY=VALUE", multiple=True,
              help="Any other training option (repeatable; our names or TrainingArguments', e.g. --set "
              "gradient_accumulation_steps=4 --set warmup_ratio=0.1).")  # fmt: skip
@click.option("--promote", is_flag=True, help="Promote the new version when training ends.")
@click.option("--require-no-worse", metavar="METRIC", help="With --promote: only if METRIC (e.g. wer) is no worse.")
@click.option("--wait", "wait_", is_flag=True, help="Follow progress until the job ends.")
@json_option
@click.pass_context
def train(ctx: click.Context, dataset: str, job_id: str | None, base_model: str | None, epochs: int | None,
          max_steps: int | None, learning_rate: float | None, batch_size: int | None, eval_steps: int | None,
          num_processes: int | None, report_to: str | None, lora_r: int | None, column: str | None,
          text_column: str | None, download: bool, settings_: tuple[str, ...], promote: bool,
          require_no_worse: str | None, wait_: bool, as_json: bool) -> None:  # fmt: skip
    """Fine-tune on DATASET (imagefolder or kohya folder, JSONL/CSV manifest, parquet, save_to_disk folder, or hub
    id) on the training queue.

    Everything is checked here, before anything is sent (options and their TrainingArguments aliases, dataset
    columns, and with a training worker answering: its GPUs and packages): a mistake is one line, not a job
    failing later.
    """
    import uuid

    from common.messages import TrainRequest
    from training.config import canonical_options
    from training.data import check_columns

    if Path(dataset).exists():
        dataset = str(Path(dataset).resolve())
    flags = {"base_model": base_model, "epochs": epochs, "max_steps": max_steps, "learning_rate": learning_rate,
             "batch_size": batch_size, "eval_steps": eval_steps, "num_processes": num_processes,
             "report_to": report_to, "lora_r": lora_r}  # fmt: skip
    config = canonical_options(_train_config({k: v for k, v in flags.items() if v is not None}, settings_))
    req = TrainRequest(job_id=job_id or f"train-{uuid.uuid4().hex[:10]}", dataset=dataset, column=column,
                       text_column=text_column, config=config, promote=promote, download=download,
                       require_no_worse=require_no_worse)  # fmt: skip
    client = _client(ctx)
    from training.jobs import check_train_request

    check_train_request(req)
    check_columns(dataset, column=column, text_column=text_column)
    _check_training_workers(client, req)
    client.submit_training(req)
    if not wait_:
        _emit(as_json, {"job_id": req.job_id}, lambda: click.echo(req.job_id))
        return
    info = client.wait(req.job_id, on_tick=(lambda _: None) if as_json else _train_ticker())
    result = info.extra.get("result") or {}
    _emit(as_json, {**info.as_dict(), "result": result},
          lambda: click.echo(f"{req.job_id}: {info.state.value} {json.dumps(result)}"))  # fmt: skip
    _fail_if_failed(info)


def _check_training_workers(client: Any, req: Any) -> None:
    """Options that depend on the training worker (process count, LoRA, TensorBoard, hub datasets), checked
    against what the training workers that answer report; with none answering, the worker checks at the start."""
    from training.jobs import check_against_workers, needs_worker_check

    if not needs_worker_check(req):
        return
    capabilities = client.training_capabilities()
    if not capabilities:
        click.secho("warning: no training worker answered; its GPUs and packages are checked when one takes the job",
                    err=True, fg="yellow")  # fmt: skip
        return
    check_against_workers(req, capabilities)


def _train_config(flags: dict[str, Any], sets: tuple[str, ...]) -> dict[str, Any]:
    """Options given as flags plus ``--set KEY=VALUE`` pairs, typed; the same key twice must agree."""
    from training.config import parse_override

    config = dict(flags)
    for item in sets:
        key, value = parse_override(item)
        if key in config and config[key] != value:
            raise ConfigError(f"--set {item}: {key} is already {config[key]!r} (given twice)")
        config[key] = value
    return config


def _train_ticker() -> Callable[[JobInfo], None]:
    """A line on stderr each time a training job reports a new step or evaluation."""
    seen: set[tuple[Any, Any]] = set()

    def tick(info: JobInfo) -> None:
        p = info.extra.get("progress") or {}
        if not p or (p.get("step"), p.get("metrics_step")) in seen:
            return
        seen.add((p.get("step"), p.get("metrics_step")))
        click.echo(f"step {_progress_line(p, ' ')}  {_metrics_text(p.get('metrics'), '.3f')}", err=True)

    return tick


@cli.command()
@click.argument("version")
@click.argument("dataset")
@click.option("--max-samples", type=click.IntRange(1, 10_000_000))
@click.option("--max-length", type=click.IntRange(2, 512), default=50, show_default=True)
@click.option("--timeout", type=float, default=3600, show_default=True)
@json_option
@click.pass_context
def evaluate(ctx: click.Context, version: str, dataset: str, max_samples: int | None, max_length: int,
             timeout: float, as_json: bool) -> None:  # fmt: skip
    """Score VERSION ('current' for the promoted one) on DATASET with generated captions."""
    from common.messages import EvaluateRequest

    if Path(dataset).exists():
        dataset = str(Path(dataset).resolve())
    req = EvaluateRequest(version=version, dataset=dataset, max_samples=max_samples, max_length=max_length)
    report = _client(ctx).evaluate(req, timeout=timeout)

    def human() -> None:
        for k in ("wer", "cer", "bleu4", "rouge_l", "cider"):
            if k in report:
                click.echo(f"{k:8} {report[k]:.4f}")

    _emit(as_json, report, human)


@cli.command()
@json_option
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """Model versions in the store, oldest first; * marks the promoted one."""
    store = _store(ctx)
    current = store.current()
    versions = store.list()
    rows = [{**v.as_dict(), "current": current is not None and v.version == current.version} for v in versions]

    def human() -> None:
        for r in rows:
            wer = r.get("metrics", {}).get("wer")
            click.echo(f"{'*' if r['current'] else ' '} {r['version']}  wer={'-' if wer is None else f'{wer:.3f}'}"
                       f"  base={r.get('base_model', '-')}")  # fmt: skip

    _emit(as_json, rows, human)


@cli.command()
@click.argument("version")
@click.option("--require-no-worse", metavar="METRIC", help="Refuse if METRIC (e.g. wer) is worse than the current.")
@click.option("--push-to-hub", "repo_id", metavar="REPO", help="Also upload the version to this hub repo (HF_TOKEN).")
@click.option("--public", is_flag=True, help="With --push-to-hub: create the repo public (default: private).")
@json_option
@click.pass_context
def promote(ctx: click.Context, version: str, require_no_worse: str | None, repo_id: str | None, public: bool,
            as_json: bool) -> None:  # fmt: skip
    """Make VERSION the one caption workers serve (@current); they switch between batches."""
    store = _store(ctx)
    if repo_id:  # before promoting: a failed upload must not leave a half-done promotion behind
        _push_to_hub(store.get(version), repo_id, private=not public)
    mv = store.promote(version, require_no_worse=require_no_worse)
    _emit(as_json, {**mv.as_dict(), "pushed_to": repo_id}, lambda: click.echo(f"promoted {mv.version}"))


def _push_to_hub(mv: Any, repo_id: str, *, private: bool) -> None:
    """Write the model card, then upload the version's files (safetensors, processor, captioner.json, README.md)
    as one commit to a repo created private unless asked otherwise."""
    from training.modelcard import CARD_FILE, model_card

    (mv.path / CARD_FILE).write_text(model_card(mv, repo_id), encoding="utf-8")
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise _Fail("--push-to-hub needs huggingface_hub (pip install 'captioner[worker]')") from None
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(folder_path=str(mv.path), repo_id=repo_id, commit_message=f"captioner {mv.version}")
    except Exception as exc:  # network, auth and offline errors come in many classes; all end the same way
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise _Fail(f"could not push {mv.version} to {repo_id}: {message}") from None


# --- operating ------------------------------------------------------------------------------------


@cli.command()
@json_option
@click.pass_context
def config(ctx: click.Context, as_json: bool) -> None:
    """Print the effective settings (secrets masked), as environment variables."""
    from producer.doctor import effective_settings

    values = effective_settings(_settings(ctx))
    _emit(as_json, values, lambda: [click.echo(f"{k}={'' if v is None else v}") for k, v in values.items()])


@cli.command()
@json_option
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check the broker, ledger, persistence, workers and settings; exit 1 when something is wrong."""
    from producer.doctor import FAIL, run_checks
    from worker.celery_app import create_app

    checks = run_checks(_settings(ctx), create_app(_settings(ctx)))
    marks = {"ok": click.style("ok  ", fg="green"), "warn": click.style("warn", fg="yellow"),
             "fail": click.style("FAIL", fg="red")}  # fmt: skip
    _emit(as_json, [c.as_dict() for c in checks],
          lambda: [click.echo(f"{marks[c.level]}  {c.name:20} {c.detail}") for c in checks])  # fmt: skip
    if any(c.level == FAIL for c in checks):
        ctx.exit(EXIT_ERROR)


def _remote_reader(settings: Settings) -> Callable[[str], bytes] | None:
    """What a webdataset export reads URLs and objects with: the workers' image policy (the URL guard, the allowed
    prefixes, the byte cap); None where the image stack is not installed (such rows are skipped as not_local)."""
    try:
        from worker.images import ImagePolicy, fetch_url, read_object
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
        from worker.containers import container_images
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


# --- processes -------------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--training", is_flag=True, help="Consume the training queue (fine-tune/evaluate) instead.")
@click.option("--model", envvar="CAPTIONER_MODEL",
              help="Hub id, save_pretrained directory, or @current / @VERSION from the model store.")  # fmt: skip
@click.option("--revision", envvar="CAPTIONER_MODEL_REVISION", help="Hub branch, tag or commit of --model.")
@click.option("--device", envvar="CAPTIONER_DEVICE", help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", envvar="CAPTIONER_DTYPE", type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--max-batch-size", type=click.IntRange(1, 4096), envvar="CAPTIONER_MAX_BATCH_SIZE",
              help="Most images in one generate call.")  # fmt: skip
@click.option("--max-wait-ms", type=click.IntRange(0, 60_000), envvar="CAPTIONER_MAX_WAIT_MS",
              help="Longest wait for a batch to fill.")  # fmt: skip
@click.option("--concurrency", type=click.IntRange(1, 256), envvar="CAPTIONER_CONCURRENCY",
              help="Messages in flight (threads).")  # fmt: skip
@click.option(
    "--profile",
    envvar="CAPTIONER_PROFILE",
    type=click.Choice(["exact", "fast"]),
    help="Speed profile: exact (transformers' greedy output) or fast (measured cost: bench/README.md).",
)
@click.option("--pieces", envvar="CAPTIONER_PIECES", metavar="[+|-]PIECE,...",
              help="Speed pieces on (+name) or off (-name) on top of the profile: sdpa, compile, int8, cudagraphs, "
                   "draft.")  # fmt: skip
@click.option("--hostname", help="Worker node name (default caption@<host> / train@<host>).")
@click.option("--loglevel", envvar="CAPTIONER_LOG_LEVEL", help="DEBUG, INFO, WARNING... (default INFO).")
@click.pass_context
def worker(ctx: click.Context, training: bool, model: str | None, revision: str | None, device: str | None,
           dtype: str | None, max_batch_size: int | None, max_wait_ms: int | None, concurrency: int | None,
           profile: str | None, pieces: str | None, hostname: str | None, loglevel: str | None) -> None:  # fmt: skip
    """Start a worker: one model per process, threads sharing its batches (CUDA-safe), events on.

    Options override the CAPTIONER_* settings of the same name; extra arguments go to `celery worker` unchanged.
    """
    from common.settings import use_settings
    from worker.profiles import parse_adjustments

    given = {"model": model, "model_revision": revision, "device": device, "dtype": dtype,
             "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "concurrency": concurrency,
             "profile": profile, "pieces": pieces, "log_level": loglevel}  # fmt: skip
    settings = _settings(ctx).model_copy(update={k: v for k, v in given.items() if v is not None})
    parse_adjustments(settings.pieces)  # an unknown piece is one line here, before Celery starts
    use_settings(settings)  # before the Celery app is built: it reads concurrency and queues from them
    if training:
        from training.jobs import check_training_worker

        check_training_worker(settings)  # a worker that cannot train says why and does not start
        from training.celery_app import app
    else:
        from worker.celery_app import app

    if training:
        # One job at a time in one thread, never one reserved behind it: a waiting job stays in the queue for
        # an idle training worker. A thread, not the solo pool, so the worker acks a job when it starts and
        # answers pings, revokes and shutdown while it trains.
        queue, n, node = settings.training_queue, 1, "train@%h"
        prefetch = ["--prefetch-multiplier=1", "--disable-prefetch"]
    else:
        queue = ",".join(settings.caption_queues)  # interactive first: taken from before the bulk queue
        n, node = settings.concurrency, "caption@%h"
        prefetch = [f"--prefetch-multiplier={settings.prefetch_multiplier}"]
    argv = ["worker", "--pool=threads", f"--concurrency={n}", f"--queues={queue}", "--task-events", *prefetch,
            f"--hostname={hostname or node}", f"--loglevel={settings.log_level}", "--without-mingle",
            *ctx.args]  # fmt: skip
    code = _celery_main(app, argv)
    if code:  # a worker that refused to start (a model that does not load, a device that is not there)
        ctx.exit(code)


def _celery_main(app: Any, argv: list[str]) -> int:
    """``app.worker_main(argv)``, keeping the worker's exit code (worker_main and app.start drop it)."""
    from celery.bin.celery import celery as celery_command

    celery_command.params[0].default = app  # what app.start does: the command runs this app, not an -A import
    try:
        return int(celery_command.main(args=argv, standalone_mode=False) or 0)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    finally:
        celery_command.params[0].default = None


@cli.command()
@click.option("--host", envvar="CAPTIONER_REVIEW_HOST", help="Address to bind (default 127.0.0.1; others need auth).")
@click.option("--port", type=click.IntRange(1, 65535), envvar="CAPTIONER_REVIEW_PORT", help="Port (default 8765).")
@click.pass_context
def review(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Serve the review page: jobs with live progress, a job's captions as a grid to filter, correct, accept or
    reject, exports of the reviewed items and fine-tunes on them, and model versions with their evaluations.

    Binds 127.0.0.1 unless told otherwise; any other address needs CAPTIONER_REVIEW_TOKEN or
    CAPTIONER_REVIEW_USER/CAPTIONER_REVIEW_PASSWORD, or it refuses to start.
    """
    try:
        from review.server import serve
    except ImportError as exc:
        raise _Fail(f"the review page needs its extra: pip install 'captioner[review]' ({exc})") from None
    given = {"review_host": host, "review_port": port}
    settings = _settings(ctx).model_copy(update={k: v for k, v in given.items() if v is not None})
    serve(settings, say=lambda line: click.echo(line, err=True))


@cli.command()
@click.option("--images", "n_images", type=click.IntRange(1, 10_000), default=12, show_default=True,
              help="Held-out images captioned at the end.")  # fmt: skip
@click.option("--train-images", type=click.IntRange(10, 100_000), default=2000, show_default=True)
@click.option("--steps", type=click.IntRange(1, 1_000_000), default=2000, show_default=True, help="Training steps.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Keep files here.")
@click.option(
    "--vocab",
    type=click.Choice(["words", "bert"]),
    default="words",
    show_default=True,
    help="words: a tokenizer of the captions' 30 words (45 s); bert: GIT's own 30522-word one (~6 min).",
)
@json_option
@click.pass_context
def demo(ctx: click.Context, n_images: int, train_images: int, steps: int, workdir: Path | None, vocab: str,
         as_json: bool) -> None:  # fmt: skip
    """Offline end to end: synthetic images -> fine-tune a small GIT on the queue -> evaluate -> promote ->
    caption held-out images as a bulk job -> export; prints captions and WER before and after."""
    from producer.demo import run_demo

    run_demo(_settings(ctx), n_images=n_images, train_images=train_images, steps=steps, workdir=workdir,
             as_json=as_json, vocab=vocab)  # fmt: skip


def main() -> None:
    cli(prog_name="captioner")


if __name__ == "__main__":
    main()
