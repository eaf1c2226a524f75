"""`captioner train`, `evaluate`, `models`, `promote`: fine-tunes and the model store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from common.errors import ConfigError

if TYPE_CHECKING:  # the CLI imports these lazily, so `captioner --help` stays fast
    from common.store import ModelStore
from cli.base import Fail, cli, client_of, emit, job_id_option, json_option, settings_of
from cli.jobs import fail_if_failed, train_ticker

# --- training and models ---------------------------------------------------------------------------


def _store(ctx: click.Context) -> ModelStore:
    from common.store import ModelStore

    root = settings_of(ctx).model_store
    if root is None:
        raise Fail("set CAPTIONER_MODEL_STORE to the model store directory")
    return ModelStore(root)


@cli.command()
@click.argument("dataset")
@click.option("--job-id", callback=job_id_option, help="Job id (default: a new one).")
@click.option("--base-model", help="Hub id or directory to start from (default microsoft/git-base).")
@click.option("--epochs", "--num-train-epochs", "epochs", type=click.IntRange(1, 100_000))
@click.option("--max-steps", type=click.IntRange(1, 10_000_000), help="Stop after this many optimizer steps.")
@click.option("--learning-rate", type=click.FloatRange(0, 1, min_open=True))
@click.option(
    "--batch-size",
    "--per-device-train-batch-size",
    "batch_size",
    type=click.IntRange(1, 4096),
    help="Images per forward pass and process.",
)
@click.option("--eval-steps", type=click.IntRange(1, 10_000_000))
@click.option(
    "--num-processes",
    type=click.IntRange(1, 1024),
    help="Processes of a distributed run on the training worker (its GPUs, else CPU processes).",
)
@click.option("--report-to", type=click.Choice(["none", "tensorboard"]), help="tensorboard: event files in the run.")
@click.option("--lora-r", type=click.IntRange(0, 4096), help="Train LoRA adapters of this rank (peft) instead.")
@click.option("--column", help="Image column of a manifest or dataset.")
@click.option("--text-column", help="Caption column of a manifest or dataset.")
@click.option("--download", is_flag=True, help="Hub datasets: download whole (cached) instead of streaming.")
@click.option(
    "--set",
    "settings_",
    metavar="KEY=VALUE",
    multiple=True,
    help="Any other training option (repeatable; our names or TrainingArguments', e.g. --set "
    "gradient_accumulation_steps=4 --set warmup_ratio=0.1).",
)
@click.option("--promote", is_flag=True, help="Promote the new version when training ends.")
@click.option("--require-no-worse", metavar="METRIC", help="With --promote: only if METRIC (e.g. wer) is no worse.")
@click.option("--wait", "wait_", is_flag=True, help="Follow progress until the job ends.")
@json_option
@click.pass_context
def train(
    ctx: click.Context,
    dataset: str,
    job_id: str | None,
    base_model: str | None,
    epochs: int | None,
    max_steps: int | None,
    learning_rate: float | None,
    batch_size: int | None,
    eval_steps: int | None,
    num_processes: int | None,
    report_to: str | None,
    lora_r: int | None,
    column: str | None,
    text_column: str | None,
    download: bool,
    settings_: tuple[str, ...],
    promote: bool,
    require_no_worse: str | None,
    wait_: bool,
    as_json: bool,
) -> None:
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
    flags = {
        "base_model": base_model,
        "epochs": epochs,
        "max_steps": max_steps,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "eval_steps": eval_steps,
        "num_processes": num_processes,
        "report_to": report_to,
        "lora_r": lora_r,
    }
    config = canonical_options(_train_config({k: v for k, v in flags.items() if v is not None}, settings_))
    req = TrainRequest(
        job_id=job_id or f"train-{uuid.uuid4().hex[:10]}",
        dataset=dataset,
        column=column,
        text_column=text_column,
        config=config,
        promote=promote,
        download=download,
        require_no_worse=require_no_worse,
    )
    client = client_of(ctx)

    def check_data_and_workers(req: TrainRequest) -> None:  # after the request's own check, which submit makes
        check_columns(dataset, column=column, text_column=text_column)
        _check_training_workers(client, req)

    client.submit_training(req, then_check=check_data_and_workers)
    if not wait_:
        emit(as_json, {"job_id": req.job_id}, lambda: click.echo(req.job_id))
        return
    info = client.wait(req.job_id, on_tick=(lambda _: None) if as_json else train_ticker())
    result = info.extra.get("result") or {}
    emit(
        as_json,
        {**info.as_dict(), "result": result},
        lambda: click.echo(f"{req.job_id}: {info.state.value} {json.dumps(result)}"),
    )
    fail_if_failed(info)


def _check_training_workers(client: Any, req: Any) -> None:
    """Options that depend on the training worker (process count, LoRA, TensorBoard, hub datasets), checked
    against what the training workers that answer report; with none answering, the worker checks at the start."""
    from training.requests import check_against_workers, needs_worker_check

    if not needs_worker_check(req):
        return
    capabilities = client.training_capabilities()
    if not capabilities:
        click.secho(
            "warning: no training worker answered; its GPUs and packages are checked when one takes the job",
            err=True,
            fg="yellow",
        )
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


@cli.command()
@click.argument("version")
@click.argument("dataset")
@click.option("--max-samples", type=click.IntRange(1, 10_000_000))
@click.option("--max-length", type=click.IntRange(2, 512), default=50, show_default=True)
@click.option("--timeout", type=float, default=3600, show_default=True)
@json_option
@click.pass_context
def evaluate(
    ctx: click.Context,
    version: str,
    dataset: str,
    max_samples: int | None,
    max_length: int,
    timeout: float,
    as_json: bool,
) -> None:
    """Score VERSION ('current' for the promoted one) on DATASET with generated captions."""
    from common.messages import EvaluateRequest

    if Path(dataset).exists():
        dataset = str(Path(dataset).resolve())
    req = EvaluateRequest(version=version, dataset=dataset, max_samples=max_samples, max_length=max_length)
    report = client_of(ctx).evaluate(req, timeout=timeout)

    def human() -> None:
        for k in ("wer", "cer", "bleu4", "rouge_l", "cider"):
            if k in report:
                click.echo(f"{k:8} {report[k]:.4f}")

    emit(as_json, report, human)


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
            click.echo(
                f"{'*' if r['current'] else ' '} {r['version']}  wer={'-' if wer is None else f'{wer:.3f}'}"
                f"  base={r.get('base_model', '-')}"
            )

    emit(as_json, rows, human)


@cli.command()
@click.argument("version")
@click.option("--require-no-worse", metavar="METRIC", help="Refuse if METRIC (e.g. wer) is worse than the current.")
@click.option("--push-to-hub", "repo_id", metavar="REPO", help="Also upload the version to this hub repo (HF_TOKEN).")
@click.option("--public", is_flag=True, help="With --push-to-hub: create the repo public (default: private).")
@json_option
@click.pass_context
def promote(
    ctx: click.Context, version: str, require_no_worse: str | None, repo_id: str | None, public: bool, as_json: bool
) -> None:
    """Make VERSION the one caption workers serve (@current); they switch between batches."""
    store = _store(ctx)
    if repo_id:  # before promoting: a failed upload must not leave a half-done promotion behind
        _push_to_hub(store.get(version), repo_id, private=not public)
    mv = store.promote(version, require_no_worse=require_no_worse)
    emit(as_json, {**mv.as_dict(), "pushed_to": repo_id}, lambda: click.echo(f"promoted {mv.version}"))


def _push_to_hub(mv: Any, repo_id: str, *, private: bool) -> None:
    """Write the model card, then upload the version's files (safetensors, processor, captioner.json, README.md)
    as one commit to a repo created private unless asked otherwise."""
    from training.modelcard import CARD_FILE, model_card

    (mv.path / CARD_FILE).write_text(model_card(mv, repo_id), encoding="utf-8")
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise Fail("--push-to-hub needs huggingface_hub (pip install 'captioner[worker]')") from None
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(folder_path=str(mv.path), repo_id=repo_id, commit_message=f"captioner {mv.version}")
    except Exception as exc:  # network, auth and offline errors come in many classes; all end the same way
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise Fail(f"could not push {mv.version} to {repo_id}: {message}") from None
