"""The Grafana dashboard and the documented queries name only metrics the worker registers, correctly aggregated."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import runtime.metrics  # noqa: F401 - registers the worker's metrics in the default registry

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
METRIC_RE = re.compile(r"\bcaptioner_[a-z0-9_]+\b")
#: The series names a metric family exposes, by type (a labelled family has no samples until it is used,
#: so the names come from the type, not from a scrape).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "info": ("_info",),
}


def _registered() -> dict[str, str]:
    """Series name -> type, for every captioner_ metric in the registry."""
    out = {}
    for family in REGISTRY.collect():
        if family.name.startswith("captioner_"):
            for suffix in SUFFIXES.get(family.type, ("",)):
                out[family.name + suffix] = family.type
    return out


def _dashboard_queries() -> list[tuple[str, str]]:
    queries = []
    for board in DASHBOARDS:
        for panel in json.loads(board.read_text())["panels"]:
            queries += [(f"{board.name}: {panel['title']}", t["expr"]) for t in panel.get("targets", [])]
    return queries


def _doc_queries() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "operations.md").read_text()
    return [("docs/operations.md", q) for q in re.findall(r"`([^`]*captioner_[^`]*)`", text) if "(" in q or "{" in q]


def _check(where: str, expr: str, registered: dict[str, str]) -> list[str]:
    problems = []
    names = METRIC_RE.findall(expr)
    if not names:
        problems.append(f"{where}: {expr!r} uses no captioner metric")
    problems += [f"{where}: {n} is not registered by runtime/metrics.py" for n in names if n not in registered]
    for n in names:
        if registered.get(n) == "counter" and n.endswith("_total") and "rate(" not in expr and "increase(" not in expr:
            problems.append(f"{where}: counter {n} is shown raw; use rate() or increase()")
    # A quantile across workers needs the buckets summed by le first, or it is one quantile per series.
    for call in re.findall(r"histogram_quantile\((.*)", expr):
        if not re.search(r"sum by \([^)]*\ble\b", call):
            problems.append(f"{where}: histogram_quantile without sum by (le): {expr!r}")
    return problems


def test_dashboard_queries_use_registered_metrics() -> None:
    registered = _registered()
    assert "captioner_images_total" in registered and "captioner_stage_seconds_bucket" in registered
    queries = _dashboard_queries()
    assert DASHBOARDS and len(queries) >= 8
    problems = [p for where, expr in queries for p in _check(where, expr, registered)]
    assert not problems, "\n".join(problems)
    used = {n for _, expr in queries for n in METRIC_RE.findall(expr)}
    wanted = {
        "captioner_images_total",
        "captioner_batch_size_bucket",
        "captioner_stage_seconds_bucket",
        "captioner_queue_depth",
        "captioner_errors_total",
        "captioner_retries_total",
        "captioner_model_info",
        "captioner_gpu_memory_bytes",
    }
    assert wanted <= used, f"the dashboard lacks {sorted(wanted - used)}"


def test_documented_queries_use_registered_metrics() -> None:
    queries = _doc_queries()
    assert len(queries) >= 4
    problems = [p for where, expr in queries for p in _check(where, expr, _registered())]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_a_renamed_metric_and_a_quantile_per_worker() -> None:
    registered = _registered()
    assert _check("t", "sum(rate(captioner_image_total[5m]))", registered)
    assert _check("t", "histogram_quantile(0.95, rate(captioner_stage_seconds_bucket[5m]))", registered)
    fleet = "histogram_quantile(0.95, sum by (le) (rate(captioner_stage_seconds_bucket[5m])))"
    assert not _check("t", fleet, registered)


def test_every_panel_uses_the_provisioned_datasource() -> None:
    for board in DASHBOARDS:
        data = json.loads(board.read_text())
        ids = [p["id"] for p in data["panels"]]
        assert len(ids) == len(set(ids)), f"{board.name}: panel ids repeat"
        for panel in data["panels"]:
            for target in [panel, *panel.get("targets", [])]:
                assert target["datasource"] == {"type": "prometheus", "uid": "captioner-prometheus"}, panel["title"]
