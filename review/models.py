"""The models page's actions: promote a version (optionally only when it is no worse than the current one on a
named dataset, showing the comparison made), roll back to an earlier version, and evaluate a version on a dataset
through the training queue."""

from __future__ import annotations

import threading
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from common.errors import ConfigError, InvalidReview
from review.charts import dataset_label
from review.context import Review, json_body, review_of


def _store(ctx: Review) -> Any:
    from common.store import ModelStore

    if ctx.settings.model_store is None:
        raise ConfigError("set CAPTIONER_MODEL_STORE to the model store")
    return ModelStore(ctx.settings.model_store)


def _latest_on(meta: dict[str, Any], fingerprint: str) -> dict[str, Any] | None:
    found = [e for e in meta.get("evaluations") or [] if e.get("fingerprint") == fingerprint]
    return found[-1] if found else None


def compare(new: Any, old: Any, metric: str, fingerprint: str) -> dict[str, Any]:
    """``new`` against ``old`` on ``metric``, each from its latest evaluation on the dataset ``fingerprint``; refused
    (ConfigError, the comparison in words) when either has no such score or ``new`` is worse."""
    from common.store import LOWER_IS_BETTER

    a, b = _latest_on(new.meta, fingerprint), _latest_on(old.meta, fingerprint)
    if a is None or b is None:
        missing = new.version if a is None else old.version
        raise ConfigError(f"{missing} has no evaluation on the dataset {fingerprint}: evaluate it there first")
    x, y = (a.get("metrics") or {}).get(metric), (b.get("metrics") or {}).get(metric)
    if not isinstance(x, int | float) or not isinstance(y, int | float):
        raise ConfigError(f"no {metric} score for both versions on the dataset {fingerprint}")
    worse = x > y if metric in LOWER_IS_BETTER else x < y
    said = (
        f"{new.version} {metric} {x:.4f} vs current {old.version} {y:.4f} on {dataset_label(a)} "
        f"({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)"
    )
    if worse:
        raise ConfigError(f"not promoted: {said}")
    return {"metric": metric, "new": x, "current": y, "fingerprint": fingerprint, "said": said}


async def promote(request: Request) -> JSONResponse:
    """Make a version current. With ``require_no_worse`` (a metric) and ``fingerprint`` (a dataset both versions
    were evaluated on), only when it scores no worse there; the answer carries the comparison."""
    ctx = review_of(request)
    body = await json_body(request)
    version = request.path_params["version"]
    metric, fingerprint = body.get("require_no_worse") or None, body.get("fingerprint") or None

    def run() -> dict[str, Any]:
        store = _store(ctx)
        new, old = store.get(version), store.current()
        comparison = None
        if metric is not None and old is not None and old.version != new.version:
            if not fingerprint:
                raise InvalidReview("name the dataset (fingerprint) to compare the versions on")
            comparison = compare(new, old, str(metric), str(fingerprint))
        store.promote(new.version)
        return {"promoted": new.version, "previous": old.version if old else None, "comparison": comparison}

    return JSONResponse(await run_in_threadpool(run))


async def rollback(request: Request) -> JSONResponse:
    """Make an earlier version current again, no gate (it served before)."""
    ctx = review_of(request)
    version = request.path_params["version"]

    def run() -> dict[str, Any]:
        store = _store(ctx)
        old = store.current()
        store.promote(store.get(version).version)
        return {"promoted": version, "previous": old.version if old else None}

    return JSONResponse(await run_in_threadpool(run))


async def evaluate(request: Request) -> JSONResponse:
    """Queue an evaluation of a version on a dataset (a path the training workers can read); its scores appear on
    the models page when the training worker has run it."""
    from common.messages import EvaluateRequest

    ctx = review_of(request)
    body = await json_body(request)
    version = request.path_params["version"]
    dataset = str(body.get("dataset") or "").strip()
    if not dataset:
        raise InvalidReview("name the dataset to evaluate on (a folder or manifest the training workers can read)")
    await run_in_threadpool(lambda: _store(ctx).get(version))
    req = EvaluateRequest(version=version, dataset=dataset, max_length=int(body.get("max_length") or 50))
    workers = await run_in_threadpool(ctx.client.training_workers, 1.0)
    if not workers:
        raise ConfigError(
            f"no training worker answers on {ctx.settings.training_queue!r}: start one (captioner worker --training)"
        )

    def wait() -> None:
        try:
            ctx.client.evaluate(req, timeout=3600)
        except Exception as exc:  # shown on the models page's next load
            ctx.evaluations[version] = f"failed: {exc}"
        else:
            ctx.evaluations[version] = "done"

    ctx.evaluations[version] = f"running on {dataset}"
    threading.Thread(target=wait, name=f"evaluate-{version}", daemon=True).start()
    return JSONResponse({"version": version, "dataset": dataset, "state": "queued"}, status_code=202)
