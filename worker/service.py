"""The caption service inside one worker process: sources -> images -> batched engine -> result rows.

Plain Python: no Celery and no ledger here. Single calls come straight from the tasks; chunks of ledger jobs
come through ``worker.chunks``, which keeps the ledger side (attempts, poison, durable writes). The model is
loaded once, lazily, on first use (or by ``warm_up`` when the worker starts).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import copy_context
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from common.errors import Cancelled, ConfigError, EngineError, FetchError, InvalidInput, ItemError
from common.messages import QUALITY_FLAGS, GenParams, ItemResult, ItemStatus, Source, item_id, task_seed
from common.settings import Settings
from common.store import ModelStore, resolve_model
from media.containers import Blob
from media.images import FetchGuard, ImagePolicy, decode_image, read_source
from model.flags import quality_flags
from runtime import metrics
from worker import curation
from worker.batcher import MicroBatcher

if TYPE_CHECKING:
    from model.engine import CaptionEngine

log = logging.getLogger(__name__)

EngineFactory = Callable[[], "CaptionEngine"]


def _default_engine_factory(settings: Settings) -> EngineFactory:
    def load() -> CaptionEngine:
        if settings.endpoint_url:  # captions from an OpenAI-compatible server: no model in this process
            from model.endpoint import EndpointConfig, EndpointEngine

            return EndpointEngine.load(EndpointConfig.from_settings(settings))  # type: ignore[return-value]
        # The model name first (@current -> a version): a store with nothing promoted fails before torch loads.
        model = resolve_model(settings.model, settings.model_store)
        from model.engine import EngineConfig  # torch is imported here, not at module load
        from model.families import load_engine

        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        cfg = replace(EngineConfig.from_settings(settings), model=model)  # every engine setting from one place
        return load_engine(cfg)  # what the checkpoint is: GIT on its fast decoder, any other family on its adapter

    return load


#: What an item to caption is: a reference to fetch, or bytes in hand.
ItemSource = Source | Blob


class Captioned(NamedTuple):
    """What the model thread hands back for one image."""

    caption: str
    version: str
    flags: list[str] | None
    batch_ms: float  # wall time of the model batch it ran in
    reused: bool = False  # taken from the reuse cache, not from the model
    profile: str | None = None  # the speed pieces the batch ran with ("exact", "fast:sdpa,compile")
    family: str | None = None  # the model family, when not GIT ("blip", "llava"...)
    confidence: float | None = None  # mean token log-probability (the fast decoder measures it)
    captions: dict[str, str] | None = None  # every task's caption by name (params with tasks)
    scored: curation.Scored | None = None  # CLIPScore (and best-of-N candidates) when the job asks for them


class Sampled(NamedTuple):
    """A prepared image whose captions are sampled: what the engine prepared (GIT's pixels, another family's
    images), and the item id its seeds derive from."""

    pixels: Any
    item: str


def reusable(params: GenParams) -> bool:
    """Whether a caption may be reused across items with the same bytes: not for several tasks (the cache keeps
    one caption), not when sampling (an item's caption follows its own seed)."""
    return not params.tasks and not params.sampling


class ReuseCache(Protocol):
    """Captions by image digest (the ledger provides it): the same bytes are captioned once per version and params."""

    def reuse_get(self, key: str, digests: list[bytes]) -> dict[bytes, tuple[str, list[str]]]: ...

    def reuse_put(self, key: str, entries: dict[bytes, tuple[str, list[str]]], ttl_s: int) -> None: ...


def reuse_key(version: str, params: GenParams, profile: str | None = None) -> str:
    """What a reusable caption depends on besides the image bytes: the model version, the generation params and the
    speed profile (a fast profile's caption can differ from the exact one on a near-tie)."""
    return f"{version}|{profile or 'exact'}|{params.max_length}|{params.num_beams}|{params.prompt or ''}"


class DecodeGate:
    """How many images decode at once: ``while_generating`` while the model runs a batch, ``idle`` while it waits.

    On a CPU the model's threads use every core: a decoder running beside them preempts one, and the others wait
    for it at their next parallel region, so a batch takes longer than decoding saved. While the model waits for
    images, decoding is all there is to run. Decodes already under way when a batch starts run on."""

    def __init__(self, while_generating: int, idle: int) -> None:
        self.while_generating, self.idle = while_generating, max(idle, while_generating)
        self._cond = threading.Condition()
        self._active = 0
        self._generating = 0

    @property
    def active(self) -> int:
        """Images decoding now."""
        return self._active

    @property
    def generating(self) -> bool:
        return self._generating > 0

    @contextmanager
    def decoding(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._active < (self.while_generating if self._generating else self.idle))
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextmanager
    def generation(self) -> Iterator[None]:
        with self._cond:
            self._generating += 1
        try:
            yield
        finally:
            with self._cond:
                self._generating -= 1
                self._cond.notify_all()


class CaptionService:
    """Owns the engine, the batcher and the decode pool of one worker process."""

    def __init__(
        self, settings: Settings, *, engine_factory: EngineFactory | None = None, reuse: ReuseCache | None = None
    ) -> None:
        self.settings = settings
        #: Where captions are looked up by image digest before decoding (CAPTIONER_REUSE_CAPTIONS); None: off.
        self.reuse = reuse if settings.reuse_captions else None
        #: Images being captioned now, by digest and params: a duplicate arriving meanwhile waits for its twin.
        self._claims: dict[tuple[bytes, Hashable], Future[Any]] = {}
        self._claims_lock = threading.Lock()
        self.policy = ImagePolicy.from_settings(settings)
        self._engine_factory = engine_factory or _default_engine_factory(settings)
        self._engine: CaptionEngine | None = None
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._stopped = threading.Event()
        #: Seconds the engine's warm-up took at start (compiled and captured pieces; 0 when none).
        self.warm_up_s = 0.0
        self._reported_profile: str | None = None
        #: CLIP scorers (jobs with --score clip), loaded on first use on the engine's device.
        self.scorers = curation.Scorers(settings)
        self._pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        #: Decodes beside the model: ``decode_slots()`` while it generates, every decode thread while it waits (made
        #: on first use: the automatic figure needs the engine's device).
        self._gate: DecodeGate | None = None
        #: Ends URL fetches at their deadline, and all of them when the worker stops (see abandon_fetches).
        self.fetches = FetchGuard()
        self.batcher: MicroBatcher[GenParams] = MicroBatcher(
            self._run_batch,
            max_batch=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000,
            key=GenParams.key,
            name="engine",
            on_batch=metrics.observe_batch,
            fill_wait_s=settings.fill_wait_ms / 1000,
        )

    # --- the engine -----------------------------------------------------------------------------
    @property
    def engine(self) -> CaptionEngine:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    started = time.perf_counter()
                    engine = self._engine_factory()
                    log.info(
                        "model loaded version=%s device=%s dtype=%s in %.1fs",
                        engine.version,
                        engine.device,
                        engine.dtype,
                        time.perf_counter() - started,
                    )
                    if "draft" in getattr(engine, "pieces", ()):  # CAPTIONER_JPEG_DRAFT, or the profile's piece
                        self.policy = replace(self.policy, draft_edge=engine.input_edge)
                    self._engine = engine
        return self._engine

    def swap_engine(self, engine: CaptionEngine) -> None:
        """Serve a new model from the next batch on; batches in flight finish on the old one."""
        with self._lock:
            self._engine = engine

    def warm_up(self) -> str:
        version = self.engine.version
        # Compiled and graph-captured pieces are built now, at start, not on the first request.
        params = GenParams(max_length=self.settings.max_length)
        if hasattr(self.engine, "warm_up"):
            self.warm_up_s = self.engine.warm_up(self.settings.max_batch_size, params)
        if self.settings.clip_model:  # a wrong default checkpoint stops the worker at start, not a job later
            try:
                self.scorers.load(self.settings.clip_model, str(self.engine.device))
            except ItemError as exc:
                raise ConfigError(f"CAPTIONER_CLIP_MODEL: {exc}") from None
        if self.settings.model == "@current" and self._watcher is None:
            self._watcher = threading.Thread(target=self._follow_store, name="model-watch", daemon=True)
            self._watcher.start()
        return version

    def check_promoted(self) -> bool:
        """Load the store's promoted version if it is not the one served; True when it swapped."""
        current = ModelStore(self.settings.model_store).current() if self.settings.model_store else None
        if current is None or (self._engine is not None and self._engine.version == current.version):
            return False
        engine = self._engine_factory()  # loads beside the old model; batches keep running meanwhile
        if hasattr(engine, "warm_up"):  # its compiled pieces too, before it takes a batch
            engine.warm_up(self.settings.max_batch_size, GenParams(max_length=self.settings.max_length))
        old = self._engine.version if self._engine else None
        self.swap_engine(engine)
        metrics.set_model(
            engine.version,
            str(engine.device),
            str(engine.dtype).removeprefix("torch."),
            getattr(engine, "profile", None),
        )
        log.info("model swapped %s -> %s (promoted)", old, engine.version)
        return True

    def _follow_store(self) -> None:
        while not self._stopped.wait(self.settings.model_poll_s):
            try:
                self.check_promoted()
            except Exception:  # a half-written or bad version must not stop the worker serving the old one
                log.exception("could not load the promoted model; still serving the previous one")

    def _run_batch(self, items: list[Any], params: GenParams) -> list[Captioned]:
        engine = self.engine  # one engine per batch: a swap lands between batches, never inside one
        if self.settings.fault_oom_above and len(items) > self.settings.fault_oom_above:
            raise MemoryError(f"out of memory (injected: batch {len(items)} > {self.settings.fault_oom_above})")
        started = time.perf_counter()
        scored: list[curation.Scored] | None = None
        per_task = []
        with self.gate.generation():
            if curation.wants_images(params):  # scored on the same device, in the same batch, right after
                scored = curation.generate_scored(engine, self.scorers, items, params)
                per_task.append([s.generated for s in scored])
            else:
                ids = [it.item for it in items] if params.sampling else []
                pixels = [it.pixels for it in items] if params.sampling else items
                # One model call per task, each with its own prompt (and seeds), over the same images.
                stacked = engine.stack(pixels)
                for task in params.tasks or (None,):
                    call = params.for_task(task) if task is not None else params
                    if params.sampling:
                        name = task.name if task is not None else None
                        seeds = [task_seed(params.seed or 0, iid, name) for iid in ids]
                        per_task.append(engine.generate_detailed(stacked, call, seeds))
                    else:
                        per_task.append(engine.generate_detailed(stacked, call))
        batch_ms = round((time.perf_counter() - started) * 1000, 2)
        profile = getattr(engine, "profile", None)  # after the batch: a piece that failed in it is not counted
        if profile != self._reported_profile:
            self._reported_profile = profile
            metrics.set_model(engine.version, str(engine.device), str(engine.dtype).removeprefix("torch."), profile)
        out = []
        for i, gens in enumerate(zip(*per_task, strict=True)):
            flags, captions = _flags_and_captions(gens, params)
            out.append(
                Captioned(
                    gens[0].text,
                    engine.version,
                    flags,
                    batch_ms,
                    profile=profile,
                    family=_family(engine),
                    confidence=getattr(gens[0], "confidence", None),
                    captions=captions,
                    scored=scored[i] if scored else None,
                )
            )
        return out

    def decode_slots(self) -> int:
        """How many images decode and preprocess at once while the model generates (CAPTIONER_DECODE_CONCURRENCY;
        automatic: one where the model runs on the CPU, every decode thread elsewhere). While the model waits for
        images, every decode thread decodes."""
        wanted = self.settings.decode_concurrency
        if wanted == 0:
            on_cpu = str(getattr(self.engine, "device", "cpu")).startswith("cpu")
            wanted = 1 if on_cpu else self.settings.decode_threads
        return min(wanted, self.settings.decode_threads)

    @property
    def gate(self) -> DecodeGate:
        if self._gate is None:
            slots = self.decode_slots()
            with self._claims_lock:
                if self._gate is None:
                    self._gate = DecodeGate(slots, self.settings.decode_threads)
        return self._gate

    # --- captioning -----------------------------------------------------------------------------
    def _decode(self, data: bytes, params: GenParams | None = None, iid: str = "") -> Any:
        """Decode and preprocess one image's bytes, when the gate lets it (with the image, for CLIP jobs)."""
        with self.gate.decoding():
            image = decode_image(data, self.policy)
            pixels = self.engine.prepare([image])
        return curation.Held(pixels, image, iid) if params is not None and curation.wants_images(params) else pixels

    def decode_source(self, src: ItemSource) -> Any:
        """The decoded image of an item (near-duplicate hashing), by the same rules as captioning reads it."""
        return decode_image(self._read(src), self.policy)

    def _read(self, src: ItemSource) -> bytes:
        """The encoded bytes of an item: fetched (paths, URLs, objects, base64), or already in hand."""
        if isinstance(src, Blob):
            if src.error is not None:
                raise src.error
            return src.data or b""
        return read_source(src, self.policy, guard=self.fetches)

    def _prepare(
        self, iid: str, src: ItemSource, params: GenParams, group: Hashable | None
    ) -> tuple[Future[Any], float, bytes | None]:
        """Fetch, decode and preprocess one image, then queue it for a batch: (caption future, load ms, digest).

        With reuse on, the bytes' digest is looked up first: a hit is answered at once, without decoding.
        """
        started = time.perf_counter()
        if self.settings.fault_kill_ref and self.settings.fault_kill_ref in src.ref:
            log.error("drill: %s kills this worker (CAPTIONER_FAULT_KILL_REF)", src.ref)
            os._exit(137)  # as abrupt as the OOM killer or a segfaulting decoder
        digest, own = None, None
        try:
            # Curated rows carry scores the cache has not; tasks or sampling: the cache keeps one greedy caption.
            if self.reuse is None or params.curation is not None or not reusable(params):
                pixels = self._decode(self._read(src), params, iid)
            else:
                data = self._read(src)
                digest = hashlib.blake2b(data, digest_size=16).digest()
                hit = self._reused(digest, params)
                twin: Future[Any] | None = None
                if hit is not None:
                    twin = Future()
                    twin.set_result(hit)
                else:
                    twin, own = self._claim(digest, params)
                if twin is not None:  # captioned before, or being captioned now for another item
                    self.batcher.arrived()
                    return twin, (time.perf_counter() - started) * 1000, None
                pixels = self._decode(data)
            item = Sampled(pixels, iid) if params.sampling else pixels
            future = self._queue(item, params, group)
        except BaseException as exc:
            self.batcher.arrived()  # announced in caption_items, and not coming: batches stop waiting for it
            if own is not None:  # items with the same bytes waiting on this one fail the same way
                self._settle_claim(digest, params, own, exc=exc)
            raise
        if own is not None:
            future.add_done_callback(lambda done: self._settle_claim(digest, params, own, done=done))
        return future, (time.perf_counter() - started) * 1000, digest

    def _queue(self, pixels: Any, params: GenParams, group: Hashable | None) -> Future[Any]:
        """Queue one prepared image: into the micro-batcher, or straight to an engine that schedules its own requests
        (an endpoint: the server batches them, and a batch here would only wait for its slowest answer)."""
        engine = self.engine
        if not hasattr(engine, "submit"):
            return self.batcher.submit(pixels, params, group=group, expected=True)
        if isinstance(pixels, Sampled):  # the server samples by the request's own parameters (seed included)
            pixels = pixels.pixels
        calls = [params.for_task(t) for t in params.tasks] if params.tasks else [params]
        out: Future[Any] = Future()
        started = time.perf_counter()
        answers: list[Any] = [None] * len(calls)
        waiting = [len(calls)]
        lock = threading.Lock()

        def settle(index: int, done: Future[Any]) -> None:
            with lock:
                if out.done():
                    return
                if done.cancelled():  # the engine was closed with the request still queued: it goes back for later
                    out.set_exception(FetchError("abandoned, the worker is stopping", transient=True))
                    return
                exc = done.exception()
                if exc is not None:
                    error = exc if isinstance(exc, ItemError) else EngineError(f"{type(exc).__name__}: {exc}")
                    out.set_exception(error)
                    return
                answers[index] = done.result()
                waiting[0] -= 1
                if waiting[0]:
                    return
            took = time.perf_counter() - started
            metrics.observe_batch(1, took)
            flags, captions = _flags_and_captions(answers, params)
            out.set_result(
                Captioned(
                    answers[0].text,
                    engine.version,
                    flags,
                    round(took * 1000, 2),
                    family=_family(engine),
                    captions=captions,
                )
            )

        for index, call in enumerate(calls):
            engine.submit(pixels, call).add_done_callback(functools.partial(settle, index))
        self.batcher.arrived()  # announced in caption_items; it went to the engine, not into a batch
        return out

    def _claim(self, digest: bytes, params: GenParams) -> tuple[Future[Any] | None, Future[Any] | None]:
        """(a future of the caption another item with these bytes is getting now, None), or (None, a future this
        item now owns: items with the same bytes arriving meanwhile wait on it instead of being captioned)."""
        key = (digest, params.key())
        with self._claims_lock:
            owner = self._claims.get(key)
            if owner is None:
                own: Future[Any] = Future()
                self._claims[key] = own
                return None, own
        twin: Future[Any] = Future()

        def copy(done: Future[Any]) -> None:
            if done.exception() is not None:
                twin.set_exception(done.exception())
            else:
                twin.set_result(done.result()._replace(reused=True, batch_ms=0.0))

        owner.add_done_callback(copy)
        return twin, None

    def _settle_claim(
        self,
        digest: bytes | None,
        params: GenParams,
        own: Future[Any],
        *,
        done: Future[Any] | None = None,
        exc: BaseException | None = None,
    ) -> None:
        with self._claims_lock:
            self._claims.pop((digest, params.key()), None)
        if done is not None and done.exception() is None:
            own.set_result(done.result())
        else:
            own.set_exception(exc if exc is not None else done.exception())  # type: ignore[union-attr]

    def _reused(self, digest: bytes, params: GenParams) -> Captioned | None:
        """The caption this model version made before for the same bytes and params, if the cache has it."""
        assert self.reuse is not None
        engine = self.engine
        version, profile = engine.version, getattr(engine, "profile", None)
        try:
            found = self.reuse.reuse_get(reuse_key(version, params, profile), [digest]).get(digest)
        except Exception as exc:  # the cache (Redis, PostgreSQL) is an optimisation: caption the image instead
            log.warning("caption reuse lookup failed (%s: %s); captioning the image", type(exc).__name__, exc)
            return None
        if found is None:
            return None
        return Captioned(found[0], version, found[1] or None, 0.0, reused=True, profile=profile, family=_family(engine))

    def _remember(self, params: GenParams, fresh: dict[bytes, Captioned]) -> None:
        if self.reuse is None or not fresh:
            return
        by_key: dict[str, dict[bytes, tuple[str, list[str]]]] = {}
        for digest, done in fresh.items():
            key = reuse_key(done.version, params, done.profile)
            by_key.setdefault(key, {})[digest] = (done.caption, done.flags or [])
        try:
            for key, entries in by_key.items():
                self.reuse.reuse_put(key, entries, self.settings.reuse_ttl_s)
        except Exception as exc:  # as above: a cache that fails loses nothing but the reuse
            log.warning("caption reuse: %d caption(s) not remembered (%s: %s)", len(fresh), type(exc).__name__, exc)

    def caption_items(
        self,
        items: list[tuple[str, ItemSource]],
        params: GenParams,
        attempts: dict[str, int] | None = None,
        *,
        alone: bool = False,
    ) -> list[ItemResult]:
        """One result row per item, same order. Per-item failures are rows; nothing here raises for them.

        ``alone``: each item is a model batch by itself (suspects of killing a worker; see ``_triage``).
        """
        engine = self.engine  # loaded before fanning out, so decode threads don't all wait on the lock
        params = _with_default_prompt(engine, params)
        refused = self._no_room(engine, params)
        if refused is not None:  # every item would fail the same way in the model: one row each, saying why
            tried = attempts or {}
            return [error_row(row_base(i, s, params, tried.get(i, 1)), refused) for i, s in items]
        self.batcher.expect(len(items))
        # A copy of this thread's context per item: decode threads log with the task's job and task ids.
        prepared = [
            self._pool.submit(copy_context().run, self._prepare, iid, src, params, ("alone", iid) if alone else None)
            for iid, src in items
        ]
        rows: list[ItemResult] = []
        fresh: dict[bytes, Captioned] = {}
        for (iid, src), fut in zip(items, prepared, strict=True):
            base = row_base(iid, src, params, (attempts or {}).get(iid, 1))
            try:
                caption_future, load_ms, digest = fut.result()
                done: Captioned = caption_future.result()
            except ItemError as exc:
                rows.append(error_row(base, exc))
                continue
            except Exception as exc:  # a bug, not bad input: keep the batch alive, say so loudly
                log.exception("unexpected failure on %s", src.ref)
                rows.append(error_row(base, EngineError(f"{type(exc).__name__}: {exc}")))
                continue
            rows.append(
                ItemResult(
                    **base,
                    status=ItemStatus.OK,
                    caption=done.caption,
                    flags=done.flags,
                    captions=done.captions,
                    model_version=done.version,
                    reused=done.reused or None,
                    profile=done.profile,
                    family=done.family,
                    confidence=done.confidence,
                    **curation.row_fields(done.scored),
                    timings={"load_ms": round(load_ms, 2), "infer_ms": done.batch_ms},
                    finished_at=time.time(),
                )
            )
            if digest is not None and not done.reused:
                fresh[digest] = done
        self._remember(params, fresh)
        return rows

    @staticmethod
    def _no_room(engine: CaptionEngine, params: GenParams) -> InvalidInput | None:
        """Parameters the model can only fail on: the start token and a prompt's tokens fill max_length."""
        if hasattr(engine, "refuses"):  # an engine without a tokenizer here (an endpoint) says itself
            return engine.refuses(params)  # type: ignore[no-any-return]
        # The start token alone fits: GenParams keeps max_length at 2 or more.
        used = max((int(engine.prompt_ids(p).shape[-1]) for p in params.prompts() if p), default=0)
        if used < params.max_length:
            return None
        return InvalidInput(
            f"the prompt is {used - 1} token(s) after the start token, so max_length {params.max_length} leaves no "
            "room for a caption: raise max_length or shorten the prompt"
        )

    def caption_sources(self, sources: list[Source], params: GenParams) -> list[ItemResult]:
        return self.caption_items([(item_id(s.ref), s) for s in sources], params)

    def abandon_fetches(self) -> None:
        """A worker asked to stop: end the URL fetches in flight now (their items get transient rows and go back
        to the queue) and refuse new ones, so no slow server holds the shutdown; batches in flight still finish."""
        self.fetches.stop()

    def close(self) -> None:
        self._stopped.set()
        self.abandon_fetches()
        self.batcher.stop(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if hasattr(self._engine, "close"):  # an endpoint's request threads and connections
            self._engine.close()


def _with_default_prompt(engine: Any, params: GenParams) -> GenParams:
    """A job without a prompt gets the engine's default one (an endpoint's), so its rows record what was sent."""
    default = getattr(engine, "default_prompt", None)
    if params.prompt or not default:
        return params
    try:
        return GenParams.model_validate({**params.model_dump(), "prompt": default})
    except ValueError:  # no room for it in max_length: the engine refuses these params with a row saying so
        return params


def _flags_and_captions(gens: Sequence[Any], params: GenParams) -> tuple[list[str] | None, dict[str, str] | None]:
    """One image's quality flags and captions by task from its generations (one per task, or the one caption).
    Flags of any task's caption count: a retry of flagged items captions every task again."""
    found: set[str] = set()
    for gen in gens:
        # A caption that ended on its own is not cut, even when its end token fell on the last position.
        tokens = gen.tokens - 1 if gen.ended else gen.tokens
        found.update(quality_flags(gen.text, generated_tokens=tokens, max_length=params.max_length))
    flags = [f for f in QUALITY_FLAGS if f in found] or None
    captions = {t.name: g.text for t, g in zip(params.tasks, gens, strict=True)} if params.tasks else None
    return flags, captions


def _family(engine: Any) -> str | None:
    """The family a row records: None for GIT (rows made before other families existed look the same)."""
    family = getattr(engine, "family_name", None) or getattr(engine, "family", None) or "git"
    return None if family == "git" else str(family)


def row_base(iid: str, src: ItemSource, params: GenParams, attempts: int = 1) -> dict[str, Any]:
    """The fields every row of an item has, caption or error: the columns its source row carries included."""
    base = {"id": iid, "ref": src.ref, "params": params, "attempts": attempts}
    if isinstance(src, Blob) and src.extra:
        base["extra"] = src.extra
    return base


def error_row(base: dict[str, Any], exc: ItemError) -> ItemResult:
    """The row of an item that failed: its error class and message, and whether a later attempt may pass."""
    status = ItemStatus.CANCELLED if isinstance(exc, Cancelled) else ItemStatus.ERROR
    return ItemResult(
        **base,
        status=status,
        error_class=exc.code,
        error=str(exc)[:500],
        transient=exc.transient or None,
        finished_at=time.time(),
    )
