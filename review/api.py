"""The review page's JSON actions: corrections, marks, caption again, export the reviewed items, fine-tune on
them. Every state-changing request has passed the Guard (authentication, CSRF token, Origin) before it gets here."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from common.errors import ConfigError, InvalidReview
from common.messages import GenParams, TrainRequest
from ledger import MAX_REVIEW_IDS
from review.context import Review, json_body, review_of
from review.live import job_summary
from review.pages import FILTER_PARAMS, item_filter, page_size


async def items(request: Request) -> JSONResponse:
    """A page of items as JSON: the job page's query parameters, rows, the next cursor and items examined."""
    ctx = review_of(request)
    job_id = request.path_params["job_id"]
    params = {k: v for k, v in request.query_params.items() if k in (*FILTER_PARAMS, "limit")}
    filt, limit = item_filter(params), page_size(params)
    cursor = request.query_params.get("cursor")
    page = await run_in_threadpool(lambda: ctx.ledger.page(job_id, cursor=cursor, limit=limit, filt=filt))
    return JSONResponse({"rows": page.rows, "cursor": page.cursor, "scanned": page.scanned})


async def jobs(request: Request) -> JSONResponse:
    ctx = review_of(request)
    infos = await run_in_threadpool(ctx.ledger.jobs, 50)
    return JSONResponse([job_summary(i) for i in infos])


async def set_correction(request: Request) -> JSONResponse:
    ctx = review_of(request)
    body = await json_body(request)
    text = body.get("text")
    if not isinstance(text, str):
        raise InvalidReview('give the corrected caption as {"text": "..."}')
    job_id, item_id = request.path_params["job_id"], request.path_params["item_id"]
    row = await run_in_threadpool(ctx.ledger.set_correction, job_id, item_id, text, ctx.reviewer)
    return JSONResponse(row)


async def clear_correction(request: Request) -> JSONResponse:
    ctx = review_of(request)
    job_id, item_id = request.path_params["job_id"], request.path_params["item_id"]
    return JSONResponse(await run_in_threadpool(ctx.ledger.clear_correction, job_id, item_id, ctx.reviewer))


async def set_marks(request: Request) -> JSONResponse:
    ctx = review_of(request)
    body = await json_body(request)
    mark = body.get("mark")
    changed = await run_in_threadpool(
        ctx.ledger.set_mark, request.path_params["job_id"], _ids(body), mark, ctx.reviewer
    )
    return JSONResponse({"changed": changed})


async def caption_again(request: Request) -> JSONResponse:
    """Send the chosen items through the queue again with other parameters (a retry of exactly those ids)."""
    ctx = review_of(request)
    body = await json_body(request)
    job_id, ids = request.path_params["job_id"], _ids(body)
    if not ids:
        raise InvalidReview("choose at least one item")

    def run() -> int:
        info = ctx.client.status(job_id)
        old = info.params or GenParams()
        params = _params(old, body)
        ctx.ledger.set_mark(job_id, ids, None, ctx.reviewer)  # a mark judged the caption that is going away
        return ctx.client.retry(job_id, ids=ids, params=params)

    return JSONResponse({"requeued": await run_in_threadpool(run)})


async def export_reviewed(request: Request) -> JSONResponse:
    """Write the reviewed items as an imagefolder (metadata.jsonl, corrected text) into the export folder."""
    ctx = review_of(request)
    folder, summary = await run_in_threadpool(_export, ctx, request.path_params["job_id"])
    return JSONResponse({"path": str(folder), "rows": summary.rows_written, "skipped": summary.skipped_by_reason})


async def train(request: Request) -> JSONResponse:
    """Export the reviewed items, then queue a fine-tune on them (the folder must be readable by training workers)."""
    ctx = review_of(request)
    body = await json_body(request)
    job_id = request.path_params["job_id"]
    config = _train_config(body)

    def run() -> dict[str, Any]:
        folder, summary = _export(ctx, job_id)
        req = TrainRequest(
            job_id=f"train-{folder.name}"[:128], dataset=str(folder), config=config, promote=bool(body.get("promote"))
        )
        try:
            ctx.client.submit_training(req)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {"train_job": req.job_id, "dataset": str(folder), "rows": summary.rows_written}

    return JSONResponse(await run_in_threadpool(run))


# --- helpers --------------------------------------------------------------------------------------------------


def _ids(body: dict[str, Any]) -> list[str]:
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise InvalidReview('give the items as {"ids": ["..."]}')
    if len(ids) > MAX_REVIEW_IDS:
        raise InvalidReview(f"at most {MAX_REVIEW_IDS} items per request")
    return ids


def _params(old: GenParams, body: dict[str, Any]) -> GenParams:
    """The job's parameters with those the reviewer changed; out-of-range values are refused (422)."""
    from pydantic import ValidationError

    changes = {k: body[k] for k in ("max_length", "num_beams", "prompt") if body.get(k) not in (None, "")}
    try:
        return GenParams.model_validate({**old.model_dump(), **changes})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidReview(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _train_config(body: dict[str, Any]) -> dict[str, Any]:
    """A fine-tune's options from the page: base model, steps, learning rate, and KEY=VALUE extras."""
    from training.config import parse_override

    config: dict[str, Any] = {}
    for key, kind in (("base_model", str), ("max_steps", int), ("learning_rate", float)):
        value = body.get(key)
        if value not in (None, ""):
            try:
                config[key] = kind(value)
            except (TypeError, ValueError):
                raise InvalidReview(f"{key} must be a {kind.__name__}") from None
    for item in str(body.get("options") or "").split():
        key, value = parse_override(item)
        config[key] = value
    return config


def _export(ctx: Review, job_id: str) -> tuple[Path, Any]:
    """The reviewed items of a job as a new imagefolder in the export folder; refused when there are none."""
    from exports import export_rows

    root = ctx.settings.review_export_dir
    if root is None:
        raise ConfigError("set CAPTIONER_REVIEW_EXPORT_DIR to the folder reviewed exports go to")
    ctx.ledger.job(job_id)
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:80]
    folder = Path(root) / f"{slug}-reviewed-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 1000:03d}"
    folder.mkdir(parents=True)
    try:
        summary = export_rows(ctx.ledger.reviewed(job_id), "metadata", folder / "metadata.jsonl")
        if summary.rows_written == 0:
            raise ConfigError(f"job {job_id} has no reviewed caption to export: correct or accept some first")
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, summary
