"""`captioner config`, `doctor`, `worker`, `review`, `demo`: operating a deployment and starting its processes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # the CLI imports these lazily, so `captioner --help` stays fast
    pass
from cli.base import EXIT_ERROR, cli, emit, json_option, require_extra, settings_of

# --- operating ------------------------------------------------------------------------------------


@cli.command()
@json_option
@click.pass_context
def config(ctx: click.Context, as_json: bool) -> None:
    """Print the effective settings (secrets masked), as environment variables."""
    from cli.doctor import effective_settings

    values = effective_settings(settings_of(ctx))
    emit(as_json, values, lambda: [click.echo(f"{k}={'' if v is None else v}") for k, v in values.items()])


@cli.command()
@json_option
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check the broker, ledger, persistence, workers and settings; exit 1 when something is wrong."""
    from cli.doctor import FAIL, run_checks
    from runtime.celery_app import create_app

    checks = run_checks(settings_of(ctx), create_app(settings_of(ctx)))
    marks = {
        "ok": click.style("ok  ", fg="green"),
        "warn": click.style("warn", fg="yellow"),
        "fail": click.style("FAIL", fg="red"),
    }
    emit(
        as_json,
        [c.as_dict() for c in checks],
        lambda: [click.echo(f"{marks[c.level]}  {c.name:20} {c.detail}") for c in checks],
    )
    if any(c.level == FAIL for c in checks):
        ctx.exit(EXIT_ERROR)


# --- processes -------------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--training", is_flag=True, help="Consume the training queue (fine-tune/evaluate) instead.")
@click.option(
    "--model",
    envvar="CAPTIONER_MODEL",
    help="Hub id, save_pretrained directory, or @current / @VERSION from the model store.",
)
@click.option(
    "--endpoint",
    envvar="CAPTIONER_ENDPOINT_URL",
    metavar="URL",
    help="Caption through this OpenAI-compatible server (its API base, e.g. http://127.0.0.1:8000/v1); "
    "--model is then the name it serves.",
)
@click.option("--revision", envvar="CAPTIONER_MODEL_REVISION", help="Hub branch, tag or commit of --model.")
@click.option("--device", envvar="CAPTIONER_DEVICE", help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", envvar="CAPTIONER_DTYPE", type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option(
    "--max-batch-size",
    type=click.IntRange(1, 4096),
    envvar="CAPTIONER_MAX_BATCH_SIZE",
    help="Most images in one generate call.",
)
@click.option(
    "--max-wait-ms",
    type=click.IntRange(0, 60_000),
    envvar="CAPTIONER_MAX_WAIT_MS",
    help="Longest wait for a batch to fill.",
)
@click.option(
    "--concurrency", type=click.IntRange(1, 256), envvar="CAPTIONER_CONCURRENCY", help="Messages in flight (threads)."
)
@click.option(
    "--profile",
    envvar="CAPTIONER_PROFILE",
    type=click.Choice(["exact", "fast"]),
    help="Speed profile: exact (transformers' greedy output) or fast (measured cost: bench/README.md).",
)
@click.option(
    "--pieces",
    envvar="CAPTIONER_PIECES",
    metavar="[+|-]PIECE,...",
    help="Speed pieces on (+name) or off (-name) on top of the profile: sdpa, compile, int8, cudagraphs, draft.",
)
@click.option("--hostname", help="Worker node name (default caption@<host> / train@<host>).")
@click.option("--loglevel", envvar="CAPTIONER_LOG_LEVEL", help="DEBUG, INFO, WARNING... (default INFO).")
@click.pass_context
def worker(
    ctx: click.Context,
    training: bool,
    model: str | None,
    endpoint: str | None,
    revision: str | None,
    device: str | None,
    dtype: str | None,
    max_batch_size: int | None,
    max_wait_ms: int | None,
    concurrency: int | None,
    profile: str | None,
    pieces: str | None,
    hostname: str | None,
    loglevel: str | None,
) -> None:
    """Start a worker: one model per process, threads sharing its batches (CUDA-safe), events on.

    Options override the CAPTIONER_* settings of the same name; extra arguments go to `celery worker` unchanged.
    """
    require_extra("train" if training else "worker", "a training worker" if training else "a caption worker")
    from common.settings import use_settings
    from model.profiles import parse_adjustments

    given = {
        "model": model,
        "endpoint_url": endpoint,
        "model_revision": revision,
        "device": device,
        "dtype": dtype,
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "concurrency": concurrency,
        "profile": profile,
        "pieces": pieces,
        "log_level": loglevel,
    }
    settings = settings_of(ctx).model_copy(update={k: v for k, v in given.items() if v is not None})
    parse_adjustments(settings.pieces)  # an unknown piece is one line here, before Celery starts
    if settings.endpoint_url and not training:
        from model.endpoint import base_url

        base_url(settings.endpoint_url)  # a malformed URL is one line here too
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
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={n}",
        f"--queues={queue}",
        "--task-events",
        *prefetch,
        f"--hostname={hostname or node}",
        f"--loglevel={settings.log_level}",
        "--without-mingle",
        *ctx.args,
    ]
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
    require_extra("review", "the review page")
    from review.server import serve

    given = {"review_host": host, "review_port": port}
    settings = settings_of(ctx).model_copy(update={k: v for k, v in given.items() if v is not None})
    serve(settings, say=lambda line: click.echo(line, err=True))


@cli.command()
@click.option(
    "--images",
    "n_images",
    type=click.IntRange(1, 10_000),
    default=12,
    show_default=True,
    help="Held-out images captioned at the end.",
)
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
def demo(
    ctx: click.Context, n_images: int, train_images: int, steps: int, workdir: Path | None, vocab: str, as_json: bool
) -> None:
    """Offline end to end: synthetic images -> fine-tune a small GIT on the queue -> evaluate -> promote ->
    caption held-out images as a bulk job -> export; prints captions and WER before and after."""
    require_extra("train", "the demo (it trains and serves a model)")
    from cli.demo import run_demo

    run_demo(
        settings_of(ctx),
        n_images=n_images,
        train_images=train_images,
        steps=steps,
        workdir=workdir,
        as_json=as_json,
        vocab=vocab,
    )
