"""The review page's HTML views: jobs, one job's grid, one item, model versions; and thumbnails."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from common.errors import ITEM_ERROR_CODES, InvalidReview, UnknownItem
from common.messages import QUALITY_FLAGS, ItemStatus, JobKind
from ledger import ItemFilter
from review.charts import metric_charts
from review.context import PAGE_SIZES, Review, page_link, review_of
from review.live import job_summary
from review.thumbs import SIZES

#: Query parameters of the job page that select items (the cursor and page size travel beside them).
FILTER_PARAMS = ("status", "error_class", "flag", "model_version", "q", "corrected")


def item_filter(params: dict[str, str]) -> ItemFilter:
    """The filter a job page's query asks for; a value outside its choices is refused (422), never ignored."""

    def choice(name: str, allowed: tuple[str, ...]) -> str | None:
        value = params.get(name) or None
        if value is not None and value not in allowed:
            raise InvalidReview(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        return value

    status = choice("status", tuple(s.value for s in ItemStatus))
    corrected = choice("corrected", ("yes", "no"))
    return ItemFilter(
        status=ItemStatus(status) if status else None,
        error_class=choice("error_class", ITEM_ERROR_CODES),
        flag=choice("flag", ("any", *QUALITY_FLAGS)),
        model_version=params.get("model_version") or None,
        text=(params.get("q") or "").strip() or None,
        corrected=None if corrected is None else corrected == "yes",
    )


def page_size(params: dict[str, str]) -> int:
    raw = params.get("limit") or str(PAGE_SIZES[1])
    if not raw.isdigit() or int(raw) not in PAGE_SIZES:
        raise InvalidReview(f"limit must be one of {', '.join(map(str, PAGE_SIZES))}")
    return int(raw)


async def jobs_page(request: Request) -> Response:
    ctx = review_of(request)
    infos = await run_in_threadpool(ctx.ledger.jobs, 50)
    return ctx.render(request, "jobs.html", jobs=[job_summary(i) for i in infos])


async def job_page(request: Request) -> Response:
    ctx = review_of(request)
    job_id = request.path_params["job_id"]
    info = await run_in_threadpool(ctx.ledger.job, job_id)
    if info.kind is JobKind.TRAIN:
        return ctx.render(request, "train_job.html", job=info, summary=job_summary(info))
    params = {k: v for k, v in request.query_params.items() if k in (*FILTER_PARAMS, "limit")}
    filt, limit = item_filter(params), page_size(params)
    cursor = request.query_params.get("cursor")
    page = await run_in_threadpool(lambda: ctx.ledger.page(job_id, cursor=cursor, limit=limit, filt=filt))
    path = request.url.path
    return ctx.render(
        request,
        "job.html",
        job=info,
        summary=job_summary(info),
        page=page,
        params=params,
        filtered=not filt.empty,
        first_link=page_link(path, params) if cursor else None,
        next_link=page_link(path, params, cursor=page.cursor) if page.cursor else None,
        grid_link=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        page_sizes=PAGE_SIZES,
        store_base=_default_base_model(ctx),
    )


async def item_page(request: Request) -> Response:
    ctx = review_of(request)
    job_id, item_id = request.path_params["job_id"], request.path_params["item_id"]
    info = await run_in_threadpool(ctx.ledger.job, job_id)
    row = await run_in_threadpool(ctx.ledger.item, job_id, item_id)
    if row is None:
        raise UnknownItem(f"job {job_id} has no item {item_id!r}")
    back = request.query_params.get("back") or ""
    back = back if back.startswith("/jobs/") and "//" not in back else f"/jobs/{job_id}"  # our own pages only
    return ctx.render(request, "item.html", job=info, row=row, back=back)


async def thumbnail(request: Request) -> Response:
    """The item's image, made small; the browser names a job and an item, the ledger names the source."""
    ctx = review_of(request)
    job_id, item_id = request.path_params["job_id"], request.path_params["item_id"]
    size = request.query_params.get("size", "s")
    if size not in SIZES:
        raise InvalidReview(f"size must be one of {', '.join(SIZES)}")
    row = await run_in_threadpool(ctx.ledger.item, job_id, item_id)
    if row is None:
        await run_in_threadpool(ctx.ledger.job, job_id)  # an unknown job says so
        raise UnknownItem(f"job {job_id} has no item {item_id!r}")
    thumb = await run_in_threadpool(ctx.thumbs.get, job_id, item_id, str(row["ref"]), size)
    if thumb.error is not None:
        return PlainTextResponse(f"no thumbnail: {thumb.error}", status_code=404)
    return Response(thumb.data, media_type="image/jpeg", headers={"cache-control": "private, max-age=300"})


async def models_page(request: Request) -> Response:
    ctx = review_of(request)
    versions, current = await run_in_threadpool(_versions, ctx)
    return ctx.render(
        request,
        "models.html",
        versions=versions,
        current=current,
        charts=metric_charts(versions),
        store=ctx.settings.model_store,
    )


def _versions(ctx: Review) -> tuple[list[dict[str, Any]], str | None]:
    from common.store import ModelStore

    if ctx.settings.model_store is None:
        return [], None
    store = ModelStore(ctx.settings.model_store)
    current = store.current()
    return [v.as_dict() for v in store.list()], current.version if current else None


def _default_base_model(ctx: Review) -> str:
    """What a fine-tune from the page starts from unless told otherwise: the promoted version, else the model."""
    from common.store import ModelStore

    if ctx.settings.model_store is not None:
        current = ModelStore(ctx.settings.model_store).current()
        if current is not None:
            return str(current.path)
    return ctx.settings.model if not ctx.settings.model.startswith("@") else ""
