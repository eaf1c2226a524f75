"""The queue contract: task names, payload schemas, item status, item ids. No Celery, no torch.

Other services depend on these names and shapes; change them only by adding a new ``.vN`` task.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.errors import InvalidMessage

# --- task names (stable, versioned) ------------------------------------------------------------
TASK_CAPTION = "captioner.caption.v1"  # one image in, one result out (services)
TASK_CAPTION_MANY = "captioner.caption_many.v1"  # a list of images in, a list of results out (services)
TASK_CAPTION_CHUNK = "captioner.caption_chunk.v1"  # a chunk of a ledger job (the producer)
TASK_NOTIFY = "captioner.notify_done.v1"  # a job ended: send its completion task and/or webhook
TASK_TRAIN = "captioner.train.v1"  # fine-tune (training queue)
TASK_EVALUATE = "captioner.evaluate.v1"  # score a model version (training queue)

CAPTION_TASKS = (TASK_CAPTION_CHUNK, TASK_NOTIFY)  # the bulk caption queue
INTERACTIVE_TASKS = (TASK_CAPTION, TASK_CAPTION_MANY)  # the interactive caption queue, taken from first
TRAINING_TASKS = (TASK_TRAIN, TASK_EVALUATE)

#: Longest string accepted in any reference (paths and URLs); base64 payloads have their own byte cap.
MAX_REF_CHARS = 4096
#: Most items in one message.
MAX_ITEMS_PER_MESSAGE = 10_000
MAX_PROMPT_CHARS = 500


class ItemStatus(StrEnum):
    """Where one item stands. Absent from the ledger's results = pending."""

    PENDING = "pending"
    OK = "ok"
    ERROR = "error"
    CANCELLED = "cancelled"


class JobKind(StrEnum):
    """What a ledger job does: caption a manifest of images, or fine-tune a model."""

    CAPTION = "caption"
    TRAIN = "train"


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    # A training job whose code raised: it ended with an error (in its result) and is never re-run by itself.
    FAILED = "failed"


class GenParams(BaseModel):
    """Generation options of a job or call; every result records the values used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_length: int = Field(50, ge=1, le=512)
    num_beams: int = Field(1, ge=1, le=16)
    # Text the caption starts with: GIT continues it, and the result includes it.
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)

    def key(self) -> tuple[int, int, str]:
        """Batches only mix items whose parameters share this key."""
        return (self.max_length, self.num_beams, self.prompt or "")


class Source(BaseModel):
    """One image reference: exactly one of a local path, an http(s) URL, or inline base64 bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)] | None = None
    url: Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)] | None = None
    b64: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [name for name in ("path", "url", "b64") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("a source needs exactly one of 'path', 'url' or 'b64'")
        return self

    @property
    def kind(self) -> Literal["path", "url", "b64"]:
        return "path" if self.path is not None else "url" if self.url is not None else "b64"

    @property
    def ref(self) -> str:
        """The reference as one string: a path, a URL, or ``b64:<sha1>`` for inline bytes."""
        if self.b64 is not None:
            return "b64:" + hashlib.sha1(self.b64.encode()).hexdigest()
        return self.path if self.path is not None else self.url  # type: ignore[return-value]

    def decode_b64(self, max_bytes: int) -> bytes:
        """The inline bytes, checked against a size cap before and after decoding."""
        from common.errors import InvalidInput, TooLarge

        assert self.b64 is not None
        if len(self.b64) > (max_bytes * 4) // 3 + 8:
            raise TooLarge(f"inline image is over {max_bytes} bytes")
        try:
            data = base64.b64decode(self.b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"b64 is not valid base64: {exc}") from exc
        if len(data) > max_bytes:
            raise TooLarge(f"inline image is {len(data)} bytes, over {max_bytes}")
        return data

    @classmethod
    def parse(cls, text: str) -> Source:
        """A source from one string as users write it: http(s) URLs, everything else is a path."""
        lowered = text[:8].lower()
        if lowered.startswith(("http://", "https://")):
            return cls(url=text)
        return cls(path=text)


def item_id(ref: str) -> str:
    """Deterministic id of an item within a job: the same reference always gets the same id."""
    return hashlib.blake2b(ref.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def wire_source(src: Source) -> str | dict[str, str]:
    """Compact form for chunk messages: a bare string for paths and URLs, a dict for inline bytes."""
    return src.ref if src.b64 is None else {"b64": src.b64}


def source_from_wire(value: str | dict[str, str] | Source) -> Source:
    if isinstance(value, Source):
        return value
    if isinstance(value, str):
        return Source.parse(value)
    return Source.model_validate(value)


class ChunkItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(min_length=1, max_length=64)]
    src: Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)] | dict[str, str]


class ChunkMessage(BaseModel):
    """Payload of ``captioner.caption_chunk.v1``: items of one ledger job, captioned with one set of params.

    An item is ``{"id", "src"}``, or just the reference string when its id is ``item_id(ref)`` (what the
    producer sends: a third fewer bytes per pending item in Redis).
    """

    model_config = ConfigDict(extra="forbid")

    job_id: Annotated[str, Field(min_length=1, max_length=128)]
    items: Annotated[list[ChunkItem], Field(min_length=1, max_length=MAX_ITEMS_PER_MESSAGE)]
    params: GenParams = GenParams()

    @field_validator("items", mode="before")
    @classmethod
    def _bare_refs(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"id": item_id(v), "src": v} if isinstance(v, str) else v for v in value]
        return value


class CaptionRequest(BaseModel):
    """Payload of ``captioner.caption.v1``: one image (a Source, or a plain path/URL string)."""

    model_config = ConfigDict(extra="forbid")

    source: Source | Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)]
    params: GenParams = GenParams()

    def src(self) -> Source:
        return source_from_wire(self.source)


class CaptionManyRequest(BaseModel):
    """Payload of ``captioner.caption_many.v1``: up to 10,000 images, results in the same order."""

    model_config = ConfigDict(extra="forbid")

    sources: Annotated[
        list[Source | Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)]],
        Field(min_length=1, max_length=MAX_ITEMS_PER_MESSAGE),
    ]
    params: GenParams = GenParams()


class TrainRequest(BaseModel):
    """Payload of ``captioner.train.v1``: fine-tune on a dataset; the job's progress lives in the ledger."""

    model_config = ConfigDict(extra="forbid")

    job_id: Annotated[str, Field(min_length=1, max_length=128)]
    # A local imagefolder (metadata.jsonl/.csv/.parquet), a JSONL/CSV manifest, or a hub dataset id.
    dataset: Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)]
    column: str | None = None
    text_column: str | None = None
    # TrainConfig fields to override (base_model, learning_rate, epochs, batch_size, max_steps, ...).
    config: dict[str, Any] = Field(default_factory=dict)
    promote: bool = False
    # Promote only when this metric is no worse than the current version's.
    require_no_worse: str | None = None


class EvaluateRequest(BaseModel):
    """Payload of ``captioner.evaluate.v1``: score a model version on a dataset with generated captions."""

    model_config = ConfigDict(extra="forbid")

    version: Annotated[str, Field(min_length=1, max_length=256)]
    dataset: Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)]
    column: str | None = None
    text_column: str | None = None
    max_samples: int | None = Field(None, ge=1)
    max_length: int = Field(50, ge=1, le=512)


class ItemResult(BaseModel):
    """One row per input: a caption, or a named error class with a message. Never both, never neither."""

    model_config = ConfigDict(extra="ignore")

    id: str
    ref: str
    status: ItemStatus
    caption: str | None = None
    error_class: str | None = None
    error: str | None = None
    model_version: str | None = None
    params: GenParams | None = None
    attempts: int = 1
    #: Caption quality flags: empty, truncated (cut at max_length), repetition (see worker.quality).
    flags: list[str] | None = None
    #: Set on errors that may pass on a later attempt (timeouts, 5xx, out of memory).
    transient: bool | None = None
    #: Stage timings in milliseconds: load (fetch, decode, preprocess this image), infer (the model batch it ran in).
    timings: dict[str, float] = Field(default_factory=dict)
    finished_at: float | None = None
    #: Speed profile the caption was made with: "exact", or "fast:<pieces in use>" (e.g. "fast:sdpa,compile").
    profile: str | None = None


def parse_message(model: type[BaseModel], payload: object) -> BaseModel:
    """Validate a task payload, turning pydantic's error into our named ``InvalidMessage``."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        raise InvalidMessage(f"{model.__name__}: {where}: {first.get('msg')} ({exc.error_count()} error(s))") from None
