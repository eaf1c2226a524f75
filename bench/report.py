"""Ratios against their targets, and the results as JSON, a markdown table and a bar chart (PNG or hand-made SVG)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from bench.result import PATHS, PathResult

COLOURS = {"a": "#4c72b0", "b": "#dd8452", "c": "#c44e52", "d": "#8172b3", "e": "#55a868", "f": "#937860"}
#: (numerator, denominator, target): the queue path against its ceiling and the two baselines; the fast profile
#: end to end against the HF pipeline, and against the exact queue path (no target: what the profile buys).
RATIO_TARGETS = (
    ("b", "a", 0.95),
    ("b", "c", 4.0),
    ("b", "d", 1.3),
    ("f", "d", 1.5),
    ("f", "b", None),
    ("e", "a", None),
)
ENQUEUE_TARGET = 20_000  # items/s
BYTES_TARGET = 300  # Redis bytes per pending item


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def ratios(results: dict[str, PathResult]) -> list[dict[str, Any]]:
    """Each target ratio of the best rounds, with the ratio within every round beside it: on a shared machine
    the background load drifts between rounds, and a ratio that holds round by round is the one to trust."""
    out = []
    for num, den, target in RATIO_TARGETS:
        if num in results and den in results and results[den].images_per_s > 0:
            value = results[num].images_per_s / results[den].images_per_s
            pairs = zip(
                results[num].extra.get("rounds_images_per_s", []),
                results[den].extra.get("rounds_images_per_s", []),
                strict=False,
            )
            per_round = [round(n / d, 2) for n, d in pairs if d > 0]
            out.append(
                {
                    "ratio": f"{num}/{den}",
                    "value": round(value, 3),
                    "target": "-" if target is None else f">= {target:g}",
                    "verdict": "-" if target is None else verdict(value >= target),
                    "per_round": per_round,
                }
            )
    return out


def agreement(results: dict[str, PathResult]) -> dict[str, Any]:
    """How many captions of each path equal the engine's (a): greedy decoding should make b and d identical."""
    if "a" not in results:
        return {}
    ref = results["a"].captions
    out: dict[str, Any] = {"distinct_captions_a": len(set(ref))}
    for key in ("b", "c", "d", "e", "f"):
        if key in results:
            same = sum(x == y for x, y in zip(ref, results[key].captions, strict=True))
            out[f"a_vs_{key}"] = f"{same}/{len(ref)}"
    return out


def latency_check(latency: dict[str, Any]) -> dict[str, Any]:
    """A service's single image at light load: p50 against the batching wait plus its own batch (the worker's
    decode+preprocess and model time for it); the rest is Celery and Redis carrying the call and its result."""
    return {
        **latency,
        "target": f"<= {latency['bound_ms']:.1f} ms (max wait {latency['max_wait_ms']:g} + one batch)",
        "verdict": verdict(latency["p50_ms"] <= latency["bound_ms"]),
    }


def producer_checks(producer: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for source in ("directory", "url_list"):
        p = producer[source]
        rows.append(
            {
                "measure": f"enqueue rate, {source} (items/s)",
                "value": p["items_per_s"],
                "target": f">= {ENQUEUE_TARGET:,}",
                "verdict": verdict(p["items_per_s"] >= ENQUEUE_TARGET),
            }
        )
        rows.append(
            {
                "measure": f"Redis bytes per pending item, {source}",
                "value": p["redis_bytes_per_item"],
                "target": f"<= {BYTES_TARGET}",
                "verdict": verdict(p["redis_bytes_per_item"] <= BYTES_TARGET),
            }
        )
    return rows


# --- markdown -------------------------------------------------------------------------------------


def _stages(r: PathResult) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in r.stages_ms.items()) or "-"


def model_markdown(model: str, section: dict[str, Any], results: dict[str, PathResult]) -> str:
    lines = [f"### {model} (max_length {section['max_length']}, {section['images']} images)", ""]
    lines += ["| path | what | images/s | batch | dtype | tokens | CPU ms/image | ms per image by stage |"]
    lines += ["|---|---|---:|---:|---|---:|---:|---|"]
    for key, r in results.items():
        batch = f"{r.batch_size} (mean {r.extra['mean_batch']})" if "mean_batch" in r.extra else str(r.batch_size)
        tokens = f"{r.extra.get('generated_tokens', '-')} / {r.mean_tokens:.1f}"
        lines.append(
            f"| ({key}) | {PATHS[key]} | {r.images_per_s:.2f} | {batch} | {r.dtype} | {tokens} "
            f"| {r.extra.get('cpu_ms_per_image', '-')} | {_stages(r)} |"
        )
    sweeps = [
        f"({k}) " + ", ".join(f"bs{b}: {v:.2f}" for b, v in r.sweep.items()) for k, r in results.items() if r.sweep
    ]
    lines += [
        "",
        "tokens: generated per caption (counted from the ids; the queue worker does not expose them) / "
        "caption text re-tokenized (every path). CPU ms/image: CPU time of every process on the path.",
        "",
    ]
    lines += ["Batch sweeps (images/s): " + "; ".join(sweeps), ""]
    lines += ["| ratio | value | target | verdict | within each round |", "|---|---:|---|---|---|"]
    lines += [
        f"| {x['ratio']} | {x['value']:.2f} | {x['target']} | {x['verdict']} | "
        + (", ".join(f"{v:.2f}" for v in x.get("per_round", [])) or "-")
        + " |"
        for x in section["ratios"]
    ]
    if lat := section.get("latency"):
        lines += [
            f"| single-image p50 latency (ms, {lat['calls']} calls) | {lat['p50_ms']:.1f} | {lat['target']} "
            f"| {lat['verdict']} | - |",
            "",
            f"Single calls: p50 {lat['p50_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms; the worker's own time for the "
            f"image (decode+preprocess, then its batch) p50 {lat['worker_p50_ms']:.1f} ms; the queue's share "
            f"(send, deliver, result) {lat['overhead_p50_ms']:.1f} ms.",
        ]
    agree = section["captions"]
    lines += [
        "",
        "Captions equal to (a): "
        + ", ".join(f"{k.removeprefix('a_vs_')} {v}" for k, v in agree.items() if k.startswith("a_vs_"))
        + f" (distinct captions in (a): {agree.get('distinct_captions_a')})",
        "",
    ]
    return "\n".join(lines)


def quality_markdown(quality: dict[str, Any]) -> str:
    """Held-out WER of the fine-tuned demo model per variant, beside exact's, with speed and agreement."""
    lines = [
        f"### quality: the fine-tuned demo model, {quality['images']} held-out images",
        "",
        "| variant | dtype | pieces in use | WER | WER - exact | CER | BLEU-4 | captions equal to exact "
        "| images/s (in process) | warm-up s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in quality["variants"]:
        fell = "; ".join(f"{k} off: {v}" for k, v in r["fallbacks"].items())
        lines.append(
            f"| {r['variant']} | {r['dtype']} | {r['profile']}{' (' + fell + ')' if fell else ''} | {r['wer']:.4f} "
            f"| {r['wer_minus_exact']:+.4f} | {r['cer']:.4f} | {r['bleu4']:.1f} | {r['agree_with_exact']} "
            f"| {r['images_per_s']} | {r['warm_up_s']} |"
        )
    lines += [
        "",
        f"WER target: fast at most 0.01 above exact. Images drawn at {quality['scale']}x the model's input "
        "and saved as JPEG (so draft decoding has something to skip).",
        "",
    ]
    return "\n".join(lines)


def producer_markdown(producer: dict[str, Any]) -> str:
    lines = ["### producer (no worker)", "", "| measure | value | target | verdict |", "|---|---:|---|---|"]
    lines += [f"| {x['measure']} | {x['value']:,} | {x['target']} | {x['verdict']} |" for x in producer["checks"]]
    d = producer["directory"]
    lines += [
        "",
        f"{d['items']:,} items per source, chunk size {producer['chunk_size']}, "
        f"path refs of {d['ref_chars']} chars, URL refs of {producer['url_list']['ref_chars']} chars.",
        "",
    ]
    return "\n".join(lines)


# --- chart ----------------------------------------------------------------------------------------


def write_chart(out: Path, models: dict[str, dict[str, PathResult]]) -> Path:
    """images/s per path, one panel per model (their scales differ by orders of magnitude)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg_chart(out / "bench.svg", models)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.5), squeeze=False)
    for ax, (model, results) in zip(axes[0], models.items(), strict=True):
        keys = list(results)
        values = [results[k].images_per_s for k in keys]
        ax.bar([f"({k})" for k in keys], values, color=[COLOURS[k] for k in keys])
        ax.set_title(model)
        ax.set_ylabel("images/s")
        for i, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom")
    fig.tight_layout()
    path = out / "bench.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _svg_chart(path: Path, models: dict[str, dict[str, PathResult]]) -> Path:
    """A plain SVG bar chart, written by hand so the benchmark needs no plotting library."""
    colours = COLOURS
    panel_w, panel_h, top, bottom, bar_w = 360, 260, 40, 50, 50
    width = panel_w * max(1, len(models))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{panel_h}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{panel_h}" fill="white"/>',
    ]
    for n, (model, results) in enumerate(models.items()):
        x0 = n * panel_w
        peak = max((r.images_per_s for r in results.values()), default=1.0) or 1.0
        plot_h = panel_h - top - bottom
        parts.append(
            f'<text x="{x0 + panel_w / 2}" y="20" text-anchor="middle" font-weight="bold">'
            f"{escape(model)}: images/s</text>"
        )
        parts.append(
            f'<line x1="{x0 + 30}" y1="{top + plot_h}" x2="{x0 + panel_w - 20}" y2="{top + plot_h}" stroke="black"/>'
        )
        for i, (key, r) in enumerate(results.items()):
            h = plot_h * r.images_per_s / peak
            x = x0 + 45 + i * (bar_w + _bar_gap(panel_w, bar_w, len(results)))
            y = top + plot_h - h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w}" height="{h:.1f}" fill="{colours[key]}"/>')
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle">{r.images_per_s:.2f}</text>'
            )
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle">({key})</text>')
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 30}" text-anchor="middle" '
                f'font-size="10">bs {r.batch_size}</text>'
            )
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def _bar_gap(panel_w: int, bar_w: int, bars: int) -> float:
    """Space between bars so that ``bars`` of them fill the panel."""
    return max(10.0, (panel_w - 70 - bars * bar_w) / max(1, bars - 1))


def write_outputs(out: Path, data: dict[str, Any], models: dict[str, dict[str, PathResult]]) -> dict[str, Path]:
    """``bench.json``, ``bench.md`` and the chart in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    chart = write_chart(out, models)
    data["chart"] = chart.name
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    md = markdown(data, models)
    md_path = out / "bench.md"
    md_path.write_text(md, encoding="utf-8")
    return {"json": json_path, "markdown": md_path, "chart": chart}


def markdown(data: dict[str, Any], models: dict[str, dict[str, PathResult]]) -> str:
    meta = data["meta"]
    head = [
        f"## Benchmark results ({meta['date']})",
        "",
        f"`{meta['command']}` at `{meta.get('code')}`",
        "",
        f"Machine: {meta['cpus']} CPU(s), torch {meta['torch']} ({meta['torch_threads']} threads), "
        f"transformers {meta['transformers']}, celery {meta['celery']}; load average before/after: "
        f"{meta['loadavg_before']} / {meta['loadavg_after']}. Images: {meta['images_origin']}, JPEG, "
        f"longest side 64..1024 px. Best of {meta['rounds']} interleaved round(s) per path.",
        "",
    ]
    if meta["loadavg_before"][0] > (meta["cpus"] or 1) or meta["loadavg_after"][0] > (meta["cpus"] or 1):
        head += [
            "**The machine was busy (load average above its CPU count): other processes shared the cores, "
            "so these figures understate every path, unevenly.**",
            "",
        ]
    body = [model_markdown(m, data["models"][m], models[m]) for m in models]
    body += [quality_markdown(data["quality"])] if data.get("quality") else []
    tail = [producer_markdown(data["producer"])] if data.get("producer") else []
    return "\n".join(head + body + tail)
