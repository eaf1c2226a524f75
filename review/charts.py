"""Small server-drawn SVG charts of each metric over evaluations, across model versions (no chart library)."""

from __future__ import annotations

from typing import Any

METRICS = ("wer", "cer", "bleu4", "rouge_l", "cider")
WIDTH, HEIGHT, PAD = 420, 140, 24


def metric_charts(versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per metric that was ever measured: points (x, y, label) of every evaluation in time order, and the polyline.

    A version's training-time metrics count as its first point when it has no evaluation of its own.
    """
    events: list[tuple[float, str, dict[str, Any]]] = []
    for v in versions:
        evaluations = v.get("evaluations") or []
        for e in evaluations:
            events.append((float(e.get("at") or 0), v["version"], e.get("metrics") or {}))
        if not evaluations and v.get("metrics"):
            events.append((float(v.get("created") or 0), v["version"], v["metrics"]))
    events.sort(key=lambda e: e[0])
    charts = []
    for name in METRICS:
        series = [(at, version, float(m[name])) for at, version, m in events if isinstance(m.get(name), int | float)]
        if not series:
            continue
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
        charts.append(
            {"metric": name, "points": points, "line": line, "low": low, "high": high, "width": WIDTH, "height": HEIGHT}
        )
    return charts
