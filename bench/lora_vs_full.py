"""LoRA against a full fine-tune on the synthetic shapes: held-out WER and training time, one table.

    python -m bench.lora_vs_full [--steps 600] [--images 1200] [--workdir DIR]

Both start from the same small random GIT (the tests' shape: 16-pixel patches, init range 0.1) and see the same
images in the same order; only what is trained differs (every weight, or rank-r adapters on the attention).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    import torch

    from training.config import TrainConfig
    from training.data import load_examples, split_examples
    from training.evaluation import evaluate_model
    from training.finetune import train
    from training.synthetic import make_shapes
    from training.tiny import build_tiny_git

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="lora-vs-full-"))
    make_shapes(root / "data", args.images, seed=0)
    base = build_tiny_git(root / "base", seed=0, init_range=0.1, patch_size=16)
    train_set, eval_set = split_examples(load_examples(str(root / "data")), 0.1, seed=42)
    common = {
        "base_model": str(base),
        "lr_scheduler": "constant",
        "batch_size": 16,
        "grad_accum": 1,
        "max_length": 16,
        "max_steps": args.steps,
        "eval_steps": args.steps,
        "save_steps": args.steps,
        "log_steps": 50,
        "eval_batch_size": 32,
    }
    runs = {
        "full": {"learning_rate": 3e-3},
        f"lora r={args.lora_r}": {"learning_rate": 1e-2, "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r},
    }
    before = evaluate_model(base, eval_set, max_length=16, device="cpu")["wer"]
    rows = []
    for name, extra in runs.items():
        started = time.perf_counter()
        result = train(TrainConfig(**common, **extra), train_set, eval_set, root / name.replace(" ", "-"))
        seconds = time.perf_counter() - started
        wer = evaluate_model(result.final_dir, eval_set, max_length=16, device="cpu")["wer"]
        rows.append(
            {
                "run": name,
                "wer_before": round(before, 3),
                "wer_after": round(wer, 3),
                "train_s": round(seconds, 1),
                **extra,
            }
        )
    print("| run | learning rate | held-out WER before -> after | training time |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {r['learning_rate']:g} | {r['wer_before']} -> {r['wer_after']} | {r['train_s']} s |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
