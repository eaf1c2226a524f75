"""Curation's costs and savings, in one run on the same images and models (docs/curation.md):

  score/plain   images/s captioning with a CLIPScore per caption (scored in the batch) over captioning alone
  best4/greedy  images/s of best of 4 (four samples per image, scored) over greedy captioning
  hash/caption  time to perceptual-hash every image over the time to caption them all
  saved         share of engine (GPU) time saved on an archive where 30% of images are near-copies of others:
                1 - time(captioning the groups' representatives) / time(captioning every image)

The archive: ``--images`` pictures, 70% distinct (crops of scikit-image's photos at different places and scales,
and noise) and 30% near-copies of them (half size, JPEG quality 40, a 5% crop). Grouping runs through the worker's
index (worker.curation.NearDuplicates) on a redis-server of its own. Rounds are interleaved; each figure keeps its
best round. Random-weight models by default (offline); ``--model``/``--clip`` take real checkpoints.

    python -m bench.curation                     # tiny GIT and tiny CLIP, 100 images, 3 rounds, 1 torch thread
    python -m bench.curation --model DIR --clip DIR --device cuda --images 400 --out bench/results
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def archive(n: int, seed: int = 0) -> tuple[list[Any], list[int]]:
    """``n`` RGB images and, per image, the index of the distinct picture it shows (its group)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    rng = random.Random(seed)
    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "coins")
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in names]
    distinct = n - round(0.3 * n)
    images: list[Any] = []
    for i in range(distinct):
        if i % 5 == 4:  # some pictures with no structure at all
            noise = np.random.default_rng(seed + i).integers(0, 256, (224, 224, 3), dtype=np.uint8)
            images.append(Image.fromarray(noise))
            continue
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = rng.randint(min(w, h) // 3, min(w, h) // 2)
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        images.append(photo.crop((x, y, x + side, y + side)).resize((224, 224)))
    groups = list(range(distinct))
    for _ in range(n - distinct):
        g = rng.randrange(distinct)
        src = images[g]
        how = rng.choice(("half", "jpeg", "crop"))
        if how == "half":
            copy = src.resize((112, 112))
        elif how == "jpeg":
            buf = io.BytesIO()
            src.save(buf, format="JPEG", quality=40)
            copy = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        else:
            copy = src.crop((6, 6, 218, 218))
        images.append(copy)
        groups.append(g)
    return images, groups


def _caption(engine: Any, images: list[Any], params: Any, batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(images), batch):
        engine.generate_detailed(engine.stack([engine.prepare([im]) for im in images[i : i + batch]]), params)
    return time.perf_counter() - started


def _scored(engine: Any, scorers: Any, images: list[Any], params: Any, batch: int) -> float:
    from worker.curation import Held, generate_scored

    started = time.perf_counter()
    for i in range(0, len(images), batch):
        held = [Held(engine.prepare([im]), im, f"item-{i + j}") for j, im in enumerate(images[i : i + batch])]
        generate_scored(engine, scorers, held, params)
    return time.perf_counter() - started


def _hash_all(images: list[Any], phash: Any) -> float:
    started = time.perf_counter()
    for im in images:
        phash(im)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (more oversubscribe a shared one)")
    ap.add_argument("--best-of-images", type=int, default=8, help="images of the best-of-4 run (it is slow on a CPU)")
    ap.add_argument("--model", help="GIT checkpoint (default: a tiny random one built here)")
    ap.add_argument("--clip", help="CLIP checkpoint (default: a tiny random one built here)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="folder for curation.json")
    args = ap.parse_args(argv)

    import torch

    from common.messages import Curation, GenParams
    from common.settings import Settings
    from model.curation import phash
    from model.engine import CaptionEngine, EngineConfig
    from producer.local import LocalRedis
    from worker.curation import NearDuplicates, Scorers

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-curation-"))
    if not args.model:
        from training.tiny import build_tiny_git

        args.model = str(build_tiny_git(work / "git", seed=0))
    if not args.clip:
        from training.tiny_clip import build_tiny_clip

        args.clip = str(build_tiny_clip(work / "clip"))
    settings = Settings(clip_model=args.clip, reuse_captions=False)
    engine = CaptionEngine.load(EngineConfig(model=args.model, device=args.device, dtype="float32"))
    scorers = Scorers(settings)
    scorers.load(args.clip, str(engine.device))
    images, groups = archive(args.images)
    greedy = GenParams(max_length=args.max_length)
    scored = GenParams(max_length=args.max_length, curation=Curation(score="clip"))
    best4 = GenParams(max_length=args.max_length, curation=Curation(score="clip", best_of=4))

    # Near-duplicates through the worker's index: which images the job would caption.
    redis_server = LocalRedis()
    try:
        import redis

        client = redis.Redis.from_url(redis_server.url())
        index = NearDuplicates(client, "bench", settings, scorers)
        near = GenParams(max_length=args.max_length, curation=Curation(near_duplicates="phash"))
        items = [(str(i), im) for i, im in enumerate(images)]
        todo, dups = index.split("bench-job", items, near, lambda im: im, str(engine.device))
    finally:
        redis_server.stop()
    reps = [im for _, im in todo]
    print("near-duplicates:", len(todo), "captioned,", len(dups), "pointed", file=sys.stderr)
    wrong = sum(groups[int(d.item)] != groups[int(d.rep_id)] for d in dups)
    distinct = len(set(groups))
    missed = sum(int(i) >= distinct for i, _ in todo)  # copies captioned as if they were new pictures
    pairs = [(groups[int(d.rep_id)], groups[int(d.item)]) for d in dups]
    merged = sorted({pair for pair in pairs if pair[0] != pair[1]})  # distinct pictures put in one group

    _caption(engine, images[:2], greedy, 2)  # untimed warm-up
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        times = {
            "plain": _caption(engine, images, greedy, args.batch),
            "scored": _scored(engine, scorers, images, scored, args.batch),
            "best4": _scored(engine, scorers, images[: args.best_of_images], best4, args.batch),
            "greedy_few": _caption(engine, images[: args.best_of_images], greedy, args.batch),
            "reps": _caption(engine, reps, greedy, args.batch),
            "plain_again": _caption(engine, images, greedy, args.batch),  # right beside reps: the saving's baseline
            "hash": _hash_all(images, phash),
        }
        for k, v in times.items():
            best[k] = min(best.get(k, v), v)
    n = len(images)
    out = {
        "images": n,
        "device": str(engine.device),
        "images_per_s": {
            "plain": n / best["plain"],
            "scored": n / best["scored"],
            "best_of_4": args.best_of_images / best["best4"],
        },
        "ratios": {
            "score/plain": best["plain"] / best["scored"],
            "best4/greedy": best["greedy_few"] / best["best4"],  # the same images, the same batch size
            "hash/caption": best["hash"] / best["plain"],
        },
        "near_duplicates": {
            "copies": n - len(set(groups)),
            "captioned": len(todo),
            "pointed": len(dups),
            "wrong_group": wrong,
            "wrongly_merged_pictures": merged,
            "missed_copies": missed,
            "engine_time_saved": 1 - best["reps"] / min(best["plain"], best["plain_again"]),
            "images_saved": 1 - len(todo) / n,
        },
    }
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "curation.json").write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
