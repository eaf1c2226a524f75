"""`captioner demo`: the whole product on an embedded default, offline, on any machine with Redis or redis-server.

1. make a synthetic captioned image set (shapes, colours, positions, backgrounds; seeded) and a small GIT;
2. start a training worker and a caption worker (serving the store's promoted model, @current);
3. score the untrained model, fine-tune it through the queue, score the new version, promote it;
4. caption held-out images through the queue as a bulk job, export them, print image -> caption and WER.
Everything it started is stopped at the end.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
import redis
from pydantic import SecretStr

from common.messages import EvaluateRequest, GenParams, TrainRequest
from common.settings import Settings
from producer.local import LocalRedis, WorkerProcess

# The recipe's defaults (lr 5e-5, batch 32 x 2, 50 epochs) are for git-base on real photos. The demo's GIT is
# trained from scratch, so it takes a far higher rate (3e-3, decayed linearly to 0), batch 32 and no dropout.
# Measured on 2 busy CPU cores, 1 torch thread, 2000 training images (4 seeds): held-out WER 0.22 after 500
# steps, 0.09-0.19 after 1000, 0.06-0.08 after 2000 (~32 s). Batch 16 or a constant rate ended near 0.1;
# 32-pixel images near 0.1 too (shapes of 5-pixel radius are often confused); 64 pixels and wider models
# learn slower per second.
DEMO_TRAINING = {
    "learning_rate": 3e-3,
    "lr_scheduler": "linear",
    "batch_size": 32,
    "grad_accum": 1,
    "epochs": 1000,
    "max_length": 20,
    "eval_max_samples": 60,
    "eval_batch_size": 32,
    "log_steps": 50,
}
#: Image side in pixels: at 48 a shape has a radius of ~8 pixels, enough to tell a diamond from a circle.
IMAGE_SIZE = 48
#: Held-out images scored before and after training (the table shows the first --images of them).
EVAL_IMAGES = 100


def _demo_model(out_dir: Path, vocab: str = "words") -> Path:
    """The small GIT that learns fastest here: 48-pixel images in 16-pixel patches (9 image tokens), a 32-wide
    2-layer vision tower and decoder, narrow init, no dropout, and (``vocab="words"``) a tokenizer of the
    captions' 30 words.

    ``vocab="bert"`` keeps GIT's own bert-base-uncased tokenizer: its 30522-word output layer puts ~2M of the
    parameters and most of each step's time there (measured: 11 ms a step with 30 words, 60-70 ms with 30522,
    at batch 16), so the same 2000 steps take about 6 minutes instead of 45 s, to the same WER (0.08).
    """
    from training.synthetic import vocabulary
    from training.tiny import build_random_git, build_word_git, tiny_git_config

    if vocab == "bert":
        cfg = tiny_git_config(image_size=IMAGE_SIZE, patch_size=16, hidden_size=32, init_range=0.1, dropout=0.0)
        return build_random_git(out_dir, cfg, seed=0)
    return build_word_git(
        out_dir, vocabulary(), seed=0, image_size=IMAGE_SIZE, patch_size=16, hidden_size=32, init_range=0.1, dropout=0.0
    )


def _redis_or_local(
    settings: Settings, stack: ExitStack, say: Callable[[str], None]
) -> tuple[Settings, LocalRedis | None]:
    """The configured Redis when it answers; otherwise a throwaway redis-server, if one is installed."""
    try:
        redis.Redis.from_url(settings.broker_url_str, socket_connect_timeout=2).ping()
        return settings, None
    except redis.RedisError:
        local = stack.enter_context(LocalRedis())
        say(f"no Redis at the configured URL; started redis-server on port {local.port}")
        url = SecretStr(local.url(0))
        return settings.model_copy(update={"broker_url": url, "redis_url": None, "result_backend": None}), local


def _worker_env(settings: Settings, root: Path) -> dict[str, str]:
    return {
        "CAPTIONER_BROKER_URL": settings.broker_url_str,
        "CAPTIONER_RESULT_BACKEND": settings.result_backend_str,
        "CAPTIONER_REDIS_URL": settings.redis_url_str,
        "CAPTIONER_KEY_PREFIX": settings.key_prefix,
        "CAPTIONER_CAPTION_QUEUE": settings.caption_queue,
        "CAPTIONER_TRAINING_QUEUE": settings.training_queue,
        "CAPTIONER_MODEL": "@current",
        "CAPTIONER_MODEL_STORE": str(settings.model_store),
        "CAPTIONER_MODEL_POLL_S": "1",
        "CAPTIONER_ALLOWED_ROOTS": str(root),
        "CAPTIONER_DTYPE": "float32",
        "CAPTIONER_METRICS_PORT": "0",
        "CAPTIONER_TORCH_THREADS": "1",  # two workers share the machine's cores
        "HF_HUB_OFFLINE": "1",
    }


def run_demo(
    settings: Settings,
    *,
    n_images: int,
    train_images: int,
    steps: int,
    workdir: Path | None,
    as_json: bool,
    vocab: str = "words",
) -> dict[str, Any]:
    from common.store import ModelStore
    from exports import export_rows
    from producer.jobs import JobClient, workers_info
    from training.synthetic import make_shapes

    started = time.perf_counter()
    say = (lambda _: None) if as_json else (lambda msg: click.echo(msg, err=True))
    with ExitStack() as stack:
        root = (workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="captioner-demo-")))).resolve()
        root.mkdir(parents=True, exist_ok=True)
        settings, local_redis = _redis_or_local(settings, stack, say)
        tag = uuid.uuid4().hex[:8]  # queues and keys of its own: a demo never takes work from other workers
        settings = settings.model_copy(
            update={
                "caption_queue": f"captioner-demo-{tag}",
                "training_queue": f"captioner-demo-train-{tag}",
                "key_prefix": f"{settings.key_prefix}-demo",
                "model_store": root / "models",
            }
        )
        say(f"1. {train_images} training and {EVAL_IMAGES} held-out images, and a small GIT, in {root}")
        make_shapes(root / "train", train_images, seed=1, size=IMAGE_SIZE)
        held_out = make_shapes(root / "held-out", max(n_images, EVAL_IMAGES), seed=2, size=IMAGE_SIZE)[:n_images]
        store = ModelStore(settings.model_store)
        base = store.add(_demo_model(root / "base-model", vocab), {"base_model": "tiny random GIT"}, "base")
        store.promote(base.version)

        say("2. starting a training worker and a caption worker")
        env = _worker_env(settings, root)
        procs = []
        for training in (True, False):
            proc = WorkerProcess(env, training=training, log=root / f"{'train' if training else 'caption'}.log")
            stack.callback(proc.terminate)
            procs.append(proc.start())
        for proc in procs:
            proc.wait_ready()
        client = JobClient(settings)
        stack.callback(client.close)

        def evaluate(version: str) -> dict[str, Any]:
            req = EvaluateRequest(version=version, dataset=str(root / "held-out"), max_length=20)
            return client.evaluate(req, timeout=300)

        say("3. scoring the untrained model, fine-tuning through the queue, scoring again")
        before = evaluate(base.version)
        every = max(25, (steps // 4) // 25 * 25)  # four evaluations (and checkpoints) per run
        config = {
            **DEMO_TRAINING,
            "base_model": str(base.path),
            "max_steps": steps,
            "eval_steps": every,
            "save_steps": every,
        }
        req = TrainRequest(job_id=f"demo-train-{tag}", dataset=str(root / "train"), config=config)
        client.submit_training(req)
        train_started = time.perf_counter()
        trained = client.wait(req.job_id, timeout=1800, poll_s=1.0, on_tick=lambda i: _show_progress(i, say))
        train_seconds = time.perf_counter() - train_started
        outcome = trained.extra.get("result") or {}
        version = outcome.get("version")
        if not version:
            reason = outcome.get("error") or "no version was stored"
            raise click.ClickException(
                f"training ended as {trained.state.value}: {reason} (worker log: {root / 'train.log'})"
            )
        after = evaluate(version)
        store.promote(version, require_no_worse="wer")
        _wait_for_version(lambda: workers_info(client.app, timeout=0.5), version)

        say(f"4. captioning the held-out images with {version} as a bulk job")
        job_id = f"demo-{tag}"
        client.enqueue((str(p) for p, _ in held_out), job_id=job_id, name="demo", params=GenParams(max_length=20))
        info = client.wait(job_id, timeout=300, on_tick=lambda _: None)
        export_rows(client.results(job_id), "jsonl", root / "captions.jsonl", overwrite=True)
        truth = {str(p): c for p, c in held_out}
        rows = sorted(client.results(job_id), key=lambda r: r["ref"])
        summary = {
            "job": info.as_dict(),
            "model_version": version,
            "wer_before": before["wer"],
            "wer_after": after["wer"],
            "metrics_after": {k: after[k] for k in ("wer", "cer", "bleu4", "rouge_l") if k in after},
            "seconds": round(time.perf_counter() - started, 1),
            "train_seconds": round(train_seconds, 1),
            # What the demo started (and stopped again on its way out).
            "started": {
                "redis_server_port": local_redis.port if local_redis else None,
                "worker_pids": [p.proc.pid for p in procs if p.proc],
            },
            "results": [_result_row(r, truth) for r in rows],
            "workdir": str(root) if workdir else None,
        }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        _print_table(summary)
    return summary


def _result_row(row: dict[str, Any], truth: dict[str, str]) -> dict[str, Any]:
    return {
        "image": Path(row["ref"]).name,
        "caption": row.get("caption"),
        "reference": truth.get(row["ref"]),
        "status": row["status"],
        "model_version": row.get("model_version"),
    }


def _show_progress(info: Any, say: Callable[[str], None]) -> None:
    p = info.extra.get("progress")
    if p and p.get("step") != getattr(_show_progress, "last", None):
        _show_progress.last = p.get("step")  # type: ignore[attr-defined]
        wer, loss = (p.get("metrics") or {}).get("wer"), p.get("loss")
        say(
            f"   step {p.get('step')}/{p.get('total_steps', '?')}  loss {'-' if loss is None else f'{loss:.3f}'}"
            + (f"  held-out WER {wer:.3f} (step {p.get('metrics_step')})" if wer is not None else "")
        )


def _wait_for_version(info: Callable[[], dict[str, dict[str, Any]]], version: str, timeout: float = 60) -> None:
    """Hot swap: the caption worker picks up the promoted version between batches, within its poll time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(i.get("model_version") == version for i in info().values()):
            return
        time.sleep(0.5)
    raise click.ClickException(f"the caption worker did not switch to {version} within {timeout:g}s")


def _print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("image", "caption (fine-tuned GIT)", "reference", title="captioner demo: held-out images")
    for row in summary["results"]:
        table.add_row(row["image"], row["caption"] or f"[red]{row['status']}", row["reference"] or "")
    Console().print(table)
    job = summary["job"]
    click.echo(
        f"held-out WER ({EVAL_IMAGES} images) {summary['wer_before']:.3f} before training -> "
        f"{summary['wer_after']:.3f} after ({summary['model_version']}); {job['ok']}/{job['total']} captioned; "
        f"{summary['train_seconds']}s training, {summary['seconds']}s in all"
    )
