"""``python -m bench.families``: images/s of every captioning family in process, against transformers' generate.

For each family a random model is built offline (training/tiny.py, training/tiny_families.py), then the same
images are captioned three ways in one run: (a) our engine at the worker's batch size, (h1) transformers' own
processor and ``generate`` one image at a time, (hb) the same with the whole batch in one ``generate`` call. The
table gives images/s, the ratios a/h1 and a/hb, and how many captions of (a) equal (h1)'s (greedy, same dtype: all
of them, where batching is exact). With ``--end-to-end``, (e) the same images also go through a real worker
serving the family (a redis-server of its own, a job enqueued and followed to its end), and e/a is what the queue,
ledger and decode threads cost against the engine alone. Tiny models measure the orchestration around ``generate``
more than the model; on a GPU host ``bench/gpu.sh`` runs this with ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FAMILIES = (
    "git",
    "blip",
    "blip-2",
    "florence-2",
    "vision-encoder-decoder",
    "llava",
    "idefics3",
    "paligemma",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
    "smolvlm",
)


def build(family: str, out: Path) -> Path:
    from functools import partial

    from training import tiny, tiny_families

    builders = {
        "git": tiny.build_tiny_git,
        "blip": tiny_families.build_tiny_blip,
        "blip-2": tiny_families.build_tiny_blip2,
        "florence-2": tiny_families.build_tiny_florence2,
        "vision-encoder-decoder": tiny_families.build_tiny_vision_encoder_decoder,
        "llava": tiny_families.build_tiny_llava,
        "idefics3": tiny_families.build_tiny_idefics3,
        "paligemma": tiny_families.build_tiny_paligemma,
        "qwen2_vl": partial(tiny_families.build_tiny_qwen_vl, version="2"),
        "qwen2_5_vl": partial(tiny_families.build_tiny_qwen_vl, version="2.5"),
        "qwen3_vl": partial(tiny_families.build_tiny_qwen_vl, version="3"),
        "internvl": tiny_families.build_tiny_internvl,
        "smolvlm": tiny_families.build_tiny_smolvlm,
    }
    return builders[family](out / family)


def transformers_captions(engine: Any, images: list[Any], max_length: int, batch: int) -> list[str]:
    """transformers' processor and ``generate``, ``batch`` images per call, nothing of ours in between but the choice
    of inputs the family's model card shows (the adapter's ``batch``: processor call, chat template, prompt)."""
    import torch

    from common.messages import GenParams
    from model.families import generation_kwargs

    if not hasattr(engine, "family"):  # GIT: GitForCausalLM.generate on the processor's pixels
        out = []
        for start in range(0, len(images), batch):
            pixels = engine.processor(images=images[start : start + batch], return_tensors="pt").pixel_values
            with torch.inference_mode():
                ids = engine.model.generate(pixel_values=pixels.to(engine.device, engine.dtype), max_length=max_length)
            out += [t.strip() for t in engine.processor.batch_decode(ids, skip_special_tokens=True)]
        return out
    family, params, out = engine.family, GenParams(max_length=max_length), []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        inputs = family.batch(engine.processor, chunk, family.prompt(params), engine.device, engine.dtype)
        with torch.inference_mode():
            ids = engine.model.generate(**inputs.inputs, **generation_kwargs(params, max_length - inputs.prefix))
        texts = engine.processor.tokenizer.batch_decode(ids[:, inputs.skip :], skip_special_tokens=True)
        out += [t.strip() for t in texts]
    return out


def measure(
    family: str,
    model_dir: Path,
    images: list[Any],
    *,
    device: str,
    dtype: str,
    batch: int,
    max_length: int,
    rounds: int = 3,
) -> dict[str, Any]:
    from common.messages import GenParams
    from model.engine import EngineConfig
    from model.families import load_engine

    engine = load_engine(EngineConfig(model=str(model_dir), device=device, dtype=dtype))
    params = GenParams(max_length=max_length)
    engine.caption(images[:2], params)  # warm-up, not timed
    transformers_captions(engine, images[:1], max_length, 1)

    def ours() -> list[str]:
        out: list[str] = []
        for start in range(0, len(images), batch):
            out += engine.caption(images[start : start + batch], params)
        return out

    paths = {
        "ours": ours,
        "one": lambda: transformers_captions(engine, images, max_length, 1),
        "batch": lambda: transformers_captions(engine, images, max_length, batch),
    }
    # Rounds interleave the paths, and each path's fastest round counts: on a shared machine the neighbours' load
    # then slows every path alike, and a slow round measures the neighbours, not the path.
    best = dict.fromkeys(paths, 0.0)
    captions: dict[str, list[str]] = {}
    for _ in range(rounds):
        for name, run in paths.items():
            started = time.perf_counter()
            captions[name] = run()
            best[name] = max(best[name], len(images) / (time.perf_counter() - started))
    ours_rate, one_rate, batch_rate = best["ours"], best["one"], best["batch"]
    ours_caps, one_caps = captions["ours"], captions["one"]
    params_count = sum(p.numel() for p in engine.model.parameters())
    return {
        "family": family,
        "params": params_count,
        "ours_img_s": round(ours_rate, 2),
        "hf_one_img_s": round(one_rate, 2),
        "hf_batch_img_s": round(batch_rate, 2),
        "vs_one": round(ours_rate / one_rate, 2),
        "vs_batch": round(ours_rate / batch_rate, 2),
        "equal_to_one_by_one": f"{sum(a == b for a, b in zip(ours_caps, one_caps, strict=True))}/{len(images)}",
    }


def end_to_end(
    family: str,
    model_dir: Path,
    paths: list[Path],
    *,
    dtype: str,
    batch: int,
    max_length: int,
    rounds: int,
    log_dir: Path,
) -> float:
    """Images/s of one job of ``paths`` through a real worker serving ``model_dir`` (best of ``rounds`` jobs; the
    worker's start and a warm-up job are not timed)."""
    from bench.queued import QueueRun
    from producer.local import LocalRedis

    with LocalRedis() as redis:
        run = QueueRun(
            redis,
            model_dir,
            paths[0].parent,
            dtype=dtype,
            batch_size=batch,
            max_length=max_length,
            log=log_dir / f"worker-{family}.log",
            key="e",
        )
        run.start()
        try:
            run.ready(timeout=300, warm_up=paths[:2])
            best = 0.0
            for _ in range(rounds):
                _, seconds, _ = run._job([str(p) for p in paths])
                best = max(best, len(paths) / seconds)
            return best
        finally:
            run.stop()


def table(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| family | params | ours img/s | HF bs1 img/s | HF batched img/s | ours/bs1 | ours/batched "
        "| captions = HF bs1 | end to end img/s | e2e/ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e2e = r.get("e2e_img_s")
        lines.append(
            f"| {r['family']} | {r['params'] / 1e6:.2f}M | {r['ours_img_s']} | {r['hf_one_img_s']} | "
            f"{r['hf_batch_img_s']} | {r['vs_one']}x | {r['vs_batch']}x | {r['equal_to_one_by_one']} | "
            f"{e2e if e2e is not None else '-'} | {r.get('e2e_vs_ours', '-')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.families", description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ", ".join(FAMILIES))
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each path; the fastest counts")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    p.add_argument("--end-to-end", action="store_true", help="also caption the images through a real worker")
    args = p.parse_args(argv)
    import torch
    from PIL import Image

    from bench.inprocess import quiet_transformers
    from training.synthetic import make_shapes

    quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        p.error(f"unknown families {unknown}: use {', '.join(FAMILIES)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-families-") as tmp:
        root = Path(tmp)
        files = [path for path, _ in make_shapes(root / "img", args.images, seed=7, size=64)]
        images = [Image.open(path).convert("RGB") for path in files]
        for family in families:
            try:
                model_dir = build(family, root)
            except ImportError as exc:  # a host without the vlm extra (torchvision, num2words): the rest still run
                print(f"{family}: skipped, its processor needs what this host lacks ({exc})", file=sys.stderr)
                continue
            row = measure(
                family,
                model_dir,
                images,
                device=args.device,
                dtype=args.dtype,
                batch=args.batch,
                max_length=args.max_length,
                rounds=args.rounds,
            )
            if args.end_to_end:
                rate = end_to_end(
                    family,
                    model_dir,
                    files,
                    dtype=args.dtype,
                    batch=args.batch,
                    max_length=args.max_length,
                    rounds=args.rounds,
                    log_dir=root,
                )
                row["e2e_img_s"] = round(rate, 2)
                row["e2e_vs_ours"] = round(rate / row["ours_img_s"], 2)
            rows.append(row)
            print(json.dumps(rows[-1]), file=sys.stderr)
    header = (
        f"Tiny random models, {args.images} images, batch {args.batch}, max_length {args.max_length}, "
        f"{args.device} {args.dtype}, torch threads {torch.get_num_threads()}, best of {args.rounds} rounds"
    )
    print(table(rows, header))
    if args.out:
        args.out.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
