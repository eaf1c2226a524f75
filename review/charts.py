"""Small server-drawn SVG charts of each metric across model versions, one chart per dataset the scores were measured
on (no chart library): versions are only ever compared on the same data. A version's training-time score (measured
on the few examples training held out of its own dataset) is a series of its own, labelled as such."""

from __future__ import annotations

from typing import Any

METRICS = ("wer", "cer", "bleu4", "rouge_l", "cider")
WIDTH, HEIGHT, PAD = 420, 140, 24


def dataset_label(entry: dict[str, Any]) -> str:
    """What a score was measured on, in words: the dataset's name and size, and its fingerprint."""
    fp = entry.get("fingerprint") or "unknown"
    if entry.get("training"):
        n = entry.get("n")
        return (
            f"training-time: {n if n is not None else '?'} example(s) held out of {entry.get('dataset') or '?'} "
            f"(fingerprint {fp})"
        )
    name = entry.get("dataset") or "a dataset recorded without its name"
    size = f", {entry['n']} image(s)" if entry.get("n") is not None else ""
    return f"{name}{size} (fingerprint {fp})"


def scores(versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every score of every version: version, at, fingerprint, dataset, n, metrics, training (bool)."""
    out: list[dict[str, Any]] = []
    for v in versions:
        evaluations = v.get("evaluations") or []
        for e in evaluations:
            out.append(
                {
                    "version": v["version"],
                    "at": float(e.get("at") or 0),
                    "fingerprint": e.get("fingerprint"),
                    "dataset": e.get("dataset"),
                    "n": e.get("n"),
                    "metrics": e.get("metrics") or {},
                    "training": False,
                }
            )
        if not evaluations and v.get("metrics"):
            out.append(
                {
                    "version": v["version"],
                    "at": float(v.get("created") or 0),
                    "fingerprint": v.get("eval_fingerprint"),
                    "dataset": v.get("dataset"),
                    "n": v.get("eval_examples"),
                    "metrics": v["metrics"],
                    "training": True,
                }
            )
    out.sort(key=lambda e: e["at"])
    return out


def metric_charts(versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset (fingerprint; training-time scores apart) and metric: points (x, y, label) in time order and the
    polyline. Datasets with the most versions scored come first."""
    groups: dict[tuple[bool, str], list[dict[str, Any]]] = {}
    for s in scores(versions):
        groups.setdefault((s["training"], str(s["fingerprint"])), []).append(s)
    ordered = sorted(groups.values(), key=lambda g: (g[0]["training"], -len({s["version"] for s in g})))
    charts = []
    for group in ordered:
        label = dataset_label(group[-1] | {"dataset": next((s["dataset"] for s in group if s["dataset"]), None)})
        for name in METRICS:
            series = [
                (s["at"], s["version"], float(s["metrics"][name]))
                for s in group
                if isinstance(s["metrics"].get(name), int | float)
            ]
            if not series:
                continue
            charts.append(_chart(name, series, label, group[0]["fingerprint"], group[0]["training"]))
    return charts


def _chart(name: str, series: list[tuple[float, str, float]], label: str, fp: Any, training: bool) -> dict[str, Any]:
    low, high = min(s[2] for s in series), max(s[2] for s in series)
    span = (high - low) or 1.0
    step = (WIDTH - 2 * PAD) / max(len(series) - 1, 1)
    points = [
        {
            "x": round(PAD + i * step, 1),
            "y": round(HEIGHT - PAD - (value - low) / span * (HEIGHT - 2 * PAD), 1),
            "label": f"{version}: {name} {value:.4f}",
            "value": value,
            "at": at,
        }
        for i, (at, version, value) in enumerate(series)
    ]
    line = " ".join(f"{p['x']},{p['y']}" for p in points)
    return {
        "metric": name,
        "points": points,
        "line": line,
        "low": low,
        "high": high,
        "width": WIDTH,
        "height": HEIGHT,
        "dataset": label,
        "fingerprint": fp,
        "training": training,
    }
