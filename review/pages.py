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
from review.views import SORTS

#: Query parameters of the job page that select items (the cursor and page size travel beside them).
FILTER_PARAMS = ("status", "error_class", "flag", "model_version", "q", "corrected", "sort")


def item_filter(params: dict[str, str]) -> ItemFilter:
    """The filter a job page's query asks for; a value outside its choices is refused (422), never ignored."""

    def choice(name: str, allowed: tuple[str, ...]) -> str | None:
        value = params.get(name) or None
        if value is not None and value not in allowed:
            raise InvalidReview(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        return value

    status = choice("status", tuple(s.value for s in ItemStatus))
    corrected = choice("corrected", ("yes", "no"))
    choice("sort", tuple(SORTS))
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
    other = None if infos else await run_in_threadpool(_demo_prefix, ctx)
    return ctx.render(
        request, "jobs.html", jobs=[job_summary(i) for i in infos], prefix=ctx.settings.key_prefix, other_prefix=other
    )


def _demo_prefix(ctx: Review) -> str | None:
    """The demo's key prefix when this page sees no job and the demo's prefix holds some (Redis ledger only: the
    demo writes under ``<prefix>-demo``), so a first run of ``captioner review`` after the demo is no dead end."""
    from ledger import ledger_from_settings

    if ctx.settings.ledger_url is not None or ctx.settings.key_prefix.endswith("-demo"):
        return None
    demo = ctx.settings.key_prefix + "-demo"
    other = ledger_from_settings(ctx.settings.model_copy(update={"key_prefix": demo}))
    try:
        return demo if other.jobs(1) else None
    finally:
        other.close()


def view_page(ctx: Review, job_id: str, params: dict[str, str], cursor: str | None) -> dict[str, Any]:
    """One page of the job's view: rows, the next (and first) cursor, items examined, and the view's total when it
    is known (a filter or an order reads the whole view once, then pages from memory)."""
    from ledger import Page

    filt, limit, sort = item_filter(params), page_size(params), params.get("sort") or ""
    info = ctx.ledger.job(job_id)
    if filt.empty and not sort:
        page = ctx.ledger.page(job_id, cursor=cursor, limit=limit, filt=filt)
        return {"page": page, "total": info.total, "complete": True, "offset": None}
    view = ctx.views.get(ctx.ledger, job_id, filt, sort)
    offset = 0
    if cursor:
        if not cursor.startswith("o") or not cursor[1:].isdigit():
            raise InvalidReview(f"bad page cursor {cursor[:40]!r}; start from the first page")
        offset = int(cursor[1:])
    ids = view.ids[offset : offset + limit]
    rows = [r for r in ctx.ledger.items(job_id, ids) if r is not None]
    more = offset + limit < len(view.ids)
    page = Page(rows, f"o{offset + limit}" if more else None, len(ids))
    return {"page": page, "total": len(view.ids), "complete": view.complete, "offset": offset}


async def job_page(request: Request) -> Response:
    ctx = review_of(request)
    job_id = request.path_params["job_id"]
    info = await run_in_threadpool(ctx.ledger.job, job_id)
    if info.kind is JobKind.TRAIN:
        request_fields = await run_in_threadpool(ctx.ledger.get_field, job_id, "request")
        return ctx.render(
            request, "train_job.html", job=info, summary=job_summary(info), request_fields=request_fields or {}
        )
    params = {k: v for k, v in request.query_params.items() if k in (*FILTER_PARAMS, "limit")}
    cursor = request.query_params.get("cursor")
    view = await run_in_threadpool(view_page, ctx, job_id, params, cursor)
    progress = await run_in_threadpool(ctx.ledger.review_progress, job_id)
    assignments = await run_in_threadpool(ctx.ledger.get_field, job_id, "review_assignments") or {}
    page = view["page"]
    path = request.url.path
    filtered = not item_filter(params).empty
    return ctx.render(
        request,
        "job.html",
        job=info,
        summary=job_summary(info),
        page=page,
        params=params,
        filtered=filtered,
        view_total=view["total"],
        view_complete=view["complete"],
        offset=view["offset"],
        progress=progress,
        first_link=page_link(path, params) if cursor else None,
        next_link=page_link(path, params, cursor=page.cursor) if page.cursor else None,
        grid_link=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
        page_sizes=PAGE_SIZES,
        sorts=SORTS,
        store_base=_default_base_model(ctx),
        gate_dataset=_gate_dataset(ctx),
        roots_unset=not ctx.settings.allowed_roots,
        assignments={who: {"params": p, "link": page_link(path, p)} for who, p in sorted(assignments.items())},
    )


def _neighbours(ctx: Review, job_id: str, item_id: str, back: str) -> tuple[str | None, str | None]:
    """The items before and after this one in the grid it was opened from (the same filter, order and page)."""
    from urllib.parse import parse_qsl, urlsplit

    query = dict(parse_qsl(urlsplit(back).query))
    params = {k: v for k, v in query.items() if k in (*FILTER_PARAMS, "limit")}
    try:
        view = view_page(ctx, job_id, params, query.get("cursor"))
    except InvalidReview:
        return None, None
    ids = [r["id"] for r in view["page"].rows]
    if item_id not in ids:
        return None, None
    i = ids.index(item_id)
    nxt = ids[i + 1] if i + 1 < len(ids) else None
    if nxt is None and view["page"].cursor:
        after = view_page(ctx, job_id, params, view["page"].cursor)["page"].rows
        nxt = after[0]["id"] if after else None
    return (ids[i - 1] if i > 0 else None), nxt


async def item_page(request: Request) -> Response:
    ctx = review_of(request)
    job_id, item_id = request.path_params["job_id"], request.path_params["item_id"]
    info = await run_in_threadpool(ctx.ledger.job, job_id)
    row = await run_in_threadpool(ctx.ledger.item, job_id, item_id)
    if row is None:
        raise UnknownItem(f"job {job_id} has no item {item_id!r}")
    back = request.query_params.get("back") or ""
    back = back if back.startswith("/jobs/") and "//" not in back else f"/jobs/{job_id}"  # our own pages only
    prev_id, next_id = await run_in_threadpool(_neighbours, ctx, job_id, item_id, back)
    history = await run_in_threadpool(ctx.ledger.review_history, job_id, item_id)
    assignments = await run_in_threadpool(ctx.ledger.get_field, job_id, "review_assignments") or {}
    owners = [who for who, p in sorted(assignments.items()) if _matches(p, row)]
    ref = str(row.get("ref") or "")
    return ctx.render(
        request,
        "item.html",
        job=info,
        row=row,
        back=back,
        prev_id=prev_id,
        next_id=next_id,
        history=list(reversed(history)),
        file_name=ref.rsplit("/", 1)[-1].rsplit("::", 1)[-1],
        diff=word_diff(row.get("caption") or "", row.get("corrected") or ""),
        reasons=REJECT_REASONS,
        roots_unset=not ctx.settings.allowed_roots,
        owners=owners,
    )


def _matches(params: dict[str, str], row: dict[str, Any]) -> bool:
    try:
        return item_filter(params).matches(row)
    except InvalidReview:
        return False


#: The short list of reasons a reviewer picks from when rejecting (free text goes beside it).
REJECT_REASONS = (
    "wrong object",
    "wrong colour",
    "wrong count",
    "missing detail",
    "hallucinated",
    "not English",
    "image unreadable",
)


def word_diff(caption: str, corrected: str) -> list[tuple[str, str]]:
    """The correction against the model's caption, word by word: ("same" | "del" | "ins", words)."""
    import difflib

    if not corrected:
        return []
    a, b = caption.split(), corrected.split()
    out: list[tuple[str, str]] = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append(("same", " ".join(a[i1:i2])))
            continue
        if i2 > i1:
            out.append(("del", " ".join(a[i1:i2])))
        if j2 > j1:
            out.append(("ins", " ".join(b[j1:j2])))
    return out


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
    from review.charts import dataset_label

    versions, current = await run_in_threadpool(_versions, ctx)
    now = next((v for v in versions if v["version"] == current), None)
    evaluations = (now or {}).get("evaluations") or []
    datasets = {e["fingerprint"]: dataset_label(e) for e in evaluations if e.get("fingerprint")}
    return ctx.render(
        request,
        "models.html",
        versions=versions,
        current=current,
        charts=metric_charts(versions),
        store=ctx.settings.model_store,
        datasets=datasets,
        label=dataset_label,
        running=dict(ctx.evaluations),
    )


def _versions(ctx: Review) -> tuple[list[dict[str, Any]], str | None]:
    from common.store import ModelStore

    if ctx.settings.model_store is None:
        return [], None
    store = ModelStore(ctx.settings.model_store)
    current = store.current()
    return [v.as_dict() for v in store.list()], current.version if current else None


def _gate_dataset(ctx: Review) -> str:
    """The dataset a page fine-tune's gate compares on by default: where the current version was last evaluated."""
    from common.store import ModelStore

    if ctx.settings.model_store is None:
        return ""
    current = ModelStore(ctx.settings.model_store).current()
    evaluations = (current.meta.get("evaluations") or []) if current else []
    return str(evaluations[-1].get("dataset") or "") if evaluations else ""


def _default_base_model(ctx: Review) -> str:
    """What a fine-tune from the page starts from unless told otherwise: the promoted version, else the model."""
    from common.store import ModelStore

    if ctx.settings.model_store is not None:
        current = ModelStore(ctx.settings.model_store).current()
        if current is not None:
            return str(current.path)
    return ctx.settings.model if not ctx.settings.model.startswith("@") else ""
