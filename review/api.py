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
from starlette.responses import JSONResponse, Response

from common.errors import ConfigError, InvalidReview, UnknownItem
from common.messages import GenParams, TrainRequest
from ledger import MAX_REVIEW_IDS
from review.context import Review, json_body, review_of
from review.live import job_summary
from review.pages import FILTER_PARAMS, item_filter


async def items(request: Request) -> JSONResponse:
    """A page of items as JSON: the job page's query parameters (filters, ``sort``, ``limit``), rows, the next
    cursor, items examined, and the view's ``total`` (every matching item, not only this page)."""
    from review.pages import view_page

    ctx = review_of(request)
    job_id = request.path_params["job_id"]
    params = {k: v for k, v in request.query_params.items() if k in (*FILTER_PARAMS, "limit")}
    cursor = request.query_params.get("cursor")
    view = await run_in_threadpool(view_page, ctx, job_id, params, cursor)
    page = view["page"]
    return JSONResponse(
        {
            "rows": page.rows,
            "cursor": page.cursor,
            "scanned": page.scanned,
            "total": view["total"],
            "complete": view["complete"],
        }
    )


async def jobs(request: Request) -> JSONResponse:
    ctx = review_of(request)
    infos = await run_in_threadpool(ctx.ledger.jobs, 50)
    return JSONResponse([job_summary(i) for i in infos])


def _base_version(body: dict[str, Any]) -> int | None:
    """The review version the reviewer's edit is based on (None: write on top of whatever is there)."""
    version = body.get("base_version")
    if version is None:
        return None
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise InvalidReview("base_version must be the review_version the edit started from (a whole number)")
    return version


async def set_correction(request: Request) -> JSONResponse:
    """Store a correction; with ``base_version``, one based on an older version is refused (409) with the newer
    row, so nobody overwrites another reviewer silently."""
    ctx = review_of(request)
    body = await json_body(request)
    text = body.get("text")
    if not isinstance(text, str):
        raise InvalidReview('give the corrected caption as {"text": "..."}')
    job_id, item_id = request.path_params["job_id"], request.path_params["item_id"]
    base = _base_version(body)
    row = await run_in_threadpool(
        lambda: ctx.ledger.set_correction(job_id, item_id, text, ctx.reviewer, base_version=base)
    )
    ctx.views.forget(job_id)
    return JSONResponse(row)


async def clear_correction(request: Request) -> JSONResponse:
    ctx = review_of(request)
    job_id, item_id = request.path_params["job_id"], request.path_params["item_id"]
    raw = request.query_params.get("base_version")
    base = _base_version({"base_version": int(raw) if raw and raw.isdigit() else raw})
    row = await run_in_threadpool(lambda: ctx.ledger.clear_correction(job_id, item_id, ctx.reviewer, base_version=base))
    ctx.views.forget(job_id)
    return JSONResponse(row)


async def undo(request: Request) -> JSONResponse:
    """Put the item's review back as it was before its last change."""
    ctx = review_of(request)
    body = await json_body(request)
    job_id, item_id = request.path_params["job_id"], request.path_params["item_id"]
    base = _base_version(body)
    row = await run_in_threadpool(lambda: ctx.ledger.undo_review(job_id, item_id, ctx.reviewer, base_version=base))
    ctx.views.forget(job_id)
    return JSONResponse(row)


async def history(request: Request) -> JSONResponse:
    ctx = review_of(request)
    job_id, item_id = request.path_params["job_id"], request.path_params["item_id"]
    if await run_in_threadpool(ctx.ledger.item, job_id, item_id) is None:
        raise UnknownItem(f"job {job_id} has no item {item_id!r}")
    return JSONResponse(await run_in_threadpool(ctx.ledger.review_history, job_id, item_id))


async def set_marks(request: Request) -> JSONResponse:
    """Accept or reject items (a rejection may carry a ``reason``: one of the short list, free text, or both)."""
    ctx = review_of(request)
    body = await json_body(request)
    mark, reason = body.get("mark"), body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise InvalidReview('give the reason as {"reason": "..."}')
    job_id = request.path_params["job_id"]
    ids = _ids(body)
    changed = await run_in_threadpool(lambda: ctx.ledger.set_mark(job_id, ids, mark, ctx.reviewer, reason=reason))
    ctx.views.forget(job_id)
    return JSONResponse({"changed": changed})


async def bulk(request: Request) -> JSONResponse:
    """Accept, reject, clear or caption again everything the given filter matches (not only the page shown), as
    one background job; answers its id at once, ``GET /api/bulk/<id>`` follows its progress."""
    ctx = review_of(request)
    body = await json_body(request)
    job_id = request.path_params["job_id"]
    action = str(body.get("action") or "")
    params = {k: str(v) for k, v in (body.get("filter") or {}).items() if k in FILTER_PARAMS and v not in (None, "")}
    filt = item_filter(params)
    reason = body.get("reason") if isinstance(body.get("reason"), str) else None

    def start() -> dict[str, Any]:
        info = ctx.ledger.job(job_id)
        ids = ctx.views.get(ctx.ledger, job_id, filt, "").ids
        ctx.views.forget(job_id)
        if action == "again":
            new = _params(info.params or GenParams(), body)

            def run(batch: list[str]) -> int:
                ctx.ledger.set_mark(job_id, batch, None, ctx.reviewer)
                return ctx.client.retry(job_id, ids=batch, params=new)
        else:
            mark = {"accept": "accepted", "reject": "rejected"}.get(action)

            def run(batch: list[str]) -> int:
                return ctx.ledger.set_mark(job_id, batch, mark, ctx.reviewer, reason=reason)

        return ctx.bulks.start(job_id, action, ids, run).as_dict()

    return JSONResponse(await run_in_threadpool(start), status_code=202)


async def assign(request: Request) -> JSONResponse:
    """Give a reviewer the items a filter matches (``{"reviewer": "bea", "filter": {"q": "dog"}}``; an empty filter
    takes the assignment back). Advisory: the job page links each reviewer to their items, and the item view says
    whose an item is, so two reviewers do not take the same items."""
    ctx = review_of(request)
    body = await json_body(request)
    job_id = request.path_params["job_id"]
    reviewer = str(body.get("reviewer") or "").strip()
    if not reviewer or len(reviewer) > 100:
        raise InvalidReview("name the reviewer (at most 100 characters)")
    params = {k: str(v) for k, v in (body.get("filter") or {}).items() if k in FILTER_PARAMS and v not in (None, "")}
    params.pop("sort", None)
    item_filter(params)  # refused (422) when a value is outside its choices

    def run() -> dict[str, Any]:
        ctx.ledger.job(job_id)
        current = dict(ctx.ledger.get_field(job_id, ASSIGNMENTS) or {})
        if params:
            current[reviewer] = params
        else:
            current.pop(reviewer, None)
        ctx.ledger.set_fields(job_id, **{ASSIGNMENTS: current})
        return current

    return JSONResponse(await run_in_threadpool(run))


#: The job field holding reviewer -> filter (query parameters) assignments.
ASSIGNMENTS = "review_assignments"


async def bulk_progress(request: Request) -> JSONResponse:
    bulk = review_of(request).bulks.get(request.path_params["bulk_id"])
    if bulk.state != "running":
        review_of(request).views.forget(bulk.job_id)
    return JSONResponse(bulk.as_dict())


async def download(request: Request) -> Response:
    """The job's rows as a file to download: every row, or with ``?reviewed=1`` the reviewed ones, in any export
    format that makes one file (jsonl, csv, parquet, metadata, kohya)."""
    import tempfile

    from starlette.background import BackgroundTask
    from starlette.responses import FileResponse

    from exports.export import export_rows

    ctx = review_of(request)
    job_id = request.path_params["job_id"]
    fmt = request.query_params.get("format", "jsonl")
    if fmt not in DOWNLOAD_FORMATS:
        raise InvalidReview(f"format must be one of {', '.join(DOWNLOAD_FORMATS)}, not {fmt!r}")
    reviewed = request.query_params.get("reviewed") in ("1", "yes", "true")

    def write() -> Path:
        ctx.ledger.job(job_id)
        rows = ctx.ledger.reviewed(job_id) if reviewed else ctx.client.results(job_id)
        folder = Path(tempfile.mkdtemp(prefix="captioner-download-"))
        out = folder / ("metadata.jsonl" if fmt == "metadata" else f"rows.{DOWNLOAD_FORMATS[fmt]}")
        try:
            export_rows(rows, fmt, out)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return out

    out = await run_in_threadpool(write)
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:80]
    name = f"{slug}{'-reviewed' if reviewed else ''}.{DOWNLOAD_FORMATS[fmt]}"
    return FileResponse(
        out,
        filename=name,
        media_type="application/octet-stream",
        background=BackgroundTask(shutil.rmtree, out.parent, True),
    )


#: Export formats a download offers, with the file's extension.
DOWNLOAD_FORMATS = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet", "metadata": "jsonl", "kohya": "jsonl"}


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
        promote = bool(body.get("promote"))
        # Promoting from the page is gated unless the reviewer says otherwise: a version trained on a few reviewed
        # items must score no worse than the current one on the same data before it serves.
        gate = (body.get("require_no_worse") or None) if promote else None
        gate_dataset = str(body.get("gate_dataset") or "").strip() or None if gate else None
        req = TrainRequest(
            job_id=f"train-{folder.name}"[:128],
            dataset=str(folder),
            config=config,
            promote=promote,
            require_no_worse=gate,
            gate_dataset=gate_dataset,
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
