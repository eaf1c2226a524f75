"""The queue contract: task names, payload schemas, item status, item ids. No Celery, no torch.

Other services depend on these names and shapes; change them only by adding a new ``.vN`` task.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from common.errors import InvalidMessage
from common.uris import is_object_uri

# --- task names (stable, versioned) ------------------------------------------------------------
TASK_CAPTION = "captioner.caption.v1"  # one image in, one result out (services)
TASK_CAPTION_MANY = "captioner.caption_many.v1"  # a list of images in, a list of results out (services)
TASK_CAPTION_CHUNK = "captioner.caption_chunk.v1"  # a chunk of a ledger job (the producer)
TASK_CAPTION_CONTAINER = "captioner.caption_container.v1"  # a shard or row group of a ledger job (the producer)
TASK_NOTIFY = "captioner.notify_done.v1"  # a job ended: send its completion task and/or webhook
TASK_TRAIN = "captioner.train.v1"  # fine-tune (training queue)
TASK_EVALUATE = "captioner.evaluate.v1"  # score a model version (training queue)

CAPTION_TASKS = (TASK_CAPTION_CHUNK, TASK_CAPTION_CONTAINER, TASK_NOTIFY)  # the bulk caption queue
INTERACTIVE_TASKS = (TASK_CAPTION, TASK_CAPTION_MANY)  # the interactive caption queue, taken from first
TRAINING_TASKS = (TASK_TRAIN, TASK_EVALUATE)

#: Caption quality flags a result row may carry (see model.flags), in the order they are checked.
QUALITY_FLAGS = ("empty", "truncated", "repetition")

#: Longest string accepted in any reference (paths and URLs); base64 payloads have their own byte cap.
MAX_REF_CHARS = 4096
#: Most items in one message.
MAX_ITEMS_PER_MESSAGE = 10_000
MAX_PROMPT_CHARS = 500
#: Longest job id. Ids are part of ledger key names and of default export file names.
MAX_JOB_ID_CHARS = 128
# Letters, digits, ".", "_" and "-", starting with a letter or digit: no ":" (a key suffix of another job, such
# as "<id>:res"), no "/" and no leading "." (a path), no spaces or control characters (a terminal).
_JOB_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_JOB_ID_CHARS - 1}}}")


def check_job_id(value: str) -> str:
    """``value`` when it is a valid job id, else ValueError saying what a job id may hold.

    The producer checks ids before anything is written and the worker before anything is read, so no id can
    name another job's keys, and none the worker would refuse is accepted at enqueue.
    """
    if not _JOB_ID.fullmatch(value) or ".." in value:
        raise ValueError(
            f"job id {value[:80]!r} is not valid: 1 to {MAX_JOB_ID_CHARS} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return value


#: A job id field of a message (see check_job_id).
JobId = Annotated[str, AfterValidator(check_job_id)]


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


class TrainOutcome(StrEnum):
    """How one run of a training task ended: the ``status`` of its result."""

    DONE = "done"  # a model version (promoted, or "not promoted: why")
    CANCELLED = "cancelled"  # a user's cancel: checkpointed; submitting the job again resumes it
    # The code or its configuration raised: the job ends FAILED with the error and is never re-run by itself.
    FAILED = "failed"
    LOST_LOCK = "lost_lock"  # another runner owns the job now: stopped without writing
    INTERRUPTED = "interrupted"  # this worker is shutting down: checkpointed and unlocked, the next worker resumes it
    SKIPPED = "skipped"  # not run: the job is not RUNNING, or another runner holds it


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    # A training job whose code raised: it ended with an error (in its result) and is never re-run by itself.
    FAILED = "failed"


#: Most caption tasks in one job or call: each is one more pass of the model over every image.
MAX_TASKS = 8
#: A task's name: it becomes a column (``caption_<name>``) and a WebDataset member (``<key>.<name>.txt``).
_TASK_NAME = re.compile(r"[a-z0-9][a-z0-9_]{0,31}")


class CaptionTask(BaseModel):
    """One caption asked of every image of a job: a name the rows keep it under, and the prompt the model gets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    #: The prompt of this task's captions ("" or None: none). GIT continues it, and the caption includes it.
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _TASK_NAME.fullmatch(value):
            raise ValueError(
                f"task name {value[:40]!r} is not valid: 1 to 32 lowercase letters, digits or '_', starting with a "
                "letter or digit (it names a column and a file)"
            )
        return value


def task_seed(seed: int, item: str, task: str | None = None) -> int:
    """The sampling seed of one caption: derived from the job's seed, the item's id and the task's name, so the
    same item gets the same caption whichever batch, worker or delivery it lands in."""
    digest = hashlib.blake2b(f"{seed}:{item}:{task or ''}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: what torch.manual_seed takes


#: GenParams fields added after the first version of the contract (see GenParams._without_unset_options).
_LATER_OPTIONS = ("tasks", "temperature", "top_p", "seed", "curation")


#: ``phash[:BITS]`` (Hamming distance of 64-bit perceptual hashes, default 12) or ``clip[:COS]`` (cosine of CLIP
#: image embeddings, default 0.95).
_NEAR_DUPLICATES = re.compile(r"(phash(:(6[0-3]|[1-5]?[0-9]))?|clip(:(0(\.[0-9]+)?|1(\.0*)?))?)")
#: ``clip`` (the worker's CAPTIONER_CLIP_MODEL) or ``clip:<model store name, directory or hub id>``.
_SCORE = re.compile(r"clip(:[^\s]{1,500})?")


class Curation(BaseModel):
    """What a job asks beyond its captions (docs/curation.md): a CLIPScore on every caption, the best of N sampled
    captions, and near-duplicates captioned once per group. Absent from messages that ask none of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: ``clip`` or ``clip:<checkpoint>``: every caption gets its CLIPScore (rows' ``clip_score``).
    score: str | None = None
    #: Sample this many captions per image and keep the one with the highest CLIPScore (needs ``score``).
    best_of: int | None = Field(None, ge=2, le=64)
    #: Sampling of best-of-N; each image's seed derives from ``seed`` and its item id (see ``sample_seed``).
    temperature: float = Field(1.0, gt=0, le=10)
    top_p: float = Field(0.9, gt=0, le=1)
    seed: int = Field(0, ge=0, lt=2**63)
    #: ``phash[:BITS]`` or ``clip[:COS]``: images within the threshold are captioned once per group.
    near_duplicates: str | None = None

    @field_validator("score")
    @classmethod
    def _score(cls, value: str | None) -> str | None:
        if value is not None and not _SCORE.fullmatch(value):
            raise ValueError(f"score {value[:60]!r} is not 'clip' or 'clip:<model name, directory or hub id>'")
        return value

    @field_validator("near_duplicates")
    @classmethod
    def _near(cls, value: str | None) -> str | None:
        if value is not None and not _NEAR_DUPLICATES.fullmatch(value):
            raise ValueError(
                f"near_duplicates {value[:60]!r} is not 'phash[:BITS]' (0-63 bits) or 'clip[:COS]' (a cosine 0-1)"
            )
        return value

    @model_validator(mode="after")
    def _best_of_needs_a_score(self) -> Curation:
        if self.best_of and not self.score:
            raise ValueError("best_of keeps the caption with the highest CLIPScore: it needs score 'clip'")
        return self

    def scorer_ref(self, default: str | None) -> str | None:
        """The CLIP checkpoint the scores (and clip near-duplicates) need: the job's, else the worker's default."""
        named = self.score.partition(":")[2] if self.score else ""
        return named or default

    def needs_images(self) -> bool:
        """Whether the engine thread keeps each decoded image beside its pixels (for CLIP)."""
        return bool(self.score)


def sample_seed(seed: int, item: str) -> int:
    """The sampling seed of one image: derived from the job's seed and the item's id, so a redelivered item gets
    the same candidates whichever batch or worker it lands in."""
    digest = hashlib.blake2b(f"{seed}:{item}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: what torch.manual_seed takes


class GenParams(BaseModel):
    """Generation options of a job or call; every result records the values used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Tokens in all, the start token and the prompt included: 1 would leave no room for a single word.
    max_length: int = Field(50, ge=2, le=512)
    num_beams: int = Field(1, ge=1, le=16)
    # Text the caption starts with: GIT continues it, and the result includes it.
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    #: Several captions per image, each with its own prompt: rows keep them all by name (``captions``), and
    #: ``caption`` is the first task's. None: one caption, with ``prompt``.
    tasks: tuple[CaptionTask, ...] | None = Field(None, min_length=1, max_length=MAX_TASKS)
    #: Sampling instead of greedy decoding when either is set (greedy is the default).
    temperature: float | None = Field(None, gt=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)
    #: The job's sampling seed (default 0); each caption's own seed derives from it (see ``task_seed``).
    seed: int | None = Field(None, ge=0, lt=2**63)
    #: Scores, best of N and near-duplicates (see Curation). Left out of messages and rows when unset, so the
    #: messages, derived job ids and provenance of jobs that ask none of it are what they were.
    curation: Curation | None = None

    @model_validator(mode="after")
    def _room_for_a_caption(self) -> GenParams:
        if self.curation is not None and self.curation.needs_images() and (self.tasks or self.sampling):
            raise ValueError(
                "scores and best of N go with one greedy caption per image: not with tasks, "
                "temperature or top_p (best of N samples by its own temperature, top_p and seed)"
            )
        if self.tasks is not None:
            if self.prompt:
                raise ValueError("give a prompt per task (tasks), or one prompt, not both")
            names = [t.name for t in self.tasks]
            if len(set(names)) != len(names):
                raise ValueError(f"task names must differ, got {', '.join(names)}")
        if self.sampling and self.num_beams > 1:
            raise ValueError("sampling (temperature, top_p) and beam search (num_beams > 1) do not mix")
        # Every word is at least one token, so this refuses only what the model could never caption; a prompt of
        # few words and many tokens is refused by the worker, which has the tokenizer (invalid_input rows).
        for prompt in self.prompts():
            words = len(prompt.split()) if prompt else 0
            if words and words + 1 >= self.max_length:
                raise ValueError(
                    f"max_length {self.max_length} leaves no room for a caption after the start token and a prompt "
                    f"of {words} word(s), at least {words + 1} tokens: raise max_length or shorten the prompt"
                )
        return self

    @model_serializer(mode="wrap")
    def _without_unset_options(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Options added after v1 are left out when unset: messages, rows and derived job ids stay as they were, and
        # a worker of an earlier version (which forbids unknown fields) still takes what a newer producer sends.
        data: dict[str, Any] = handler(self)
        for name in _LATER_OPTIONS:
            if data.get(name) is None:
                data.pop(name, None)
        return data

    @property
    def sampling(self) -> bool:
        """Whether captions are sampled (temperature or top_p given) rather than greedy."""
        return self.temperature is not None or self.top_p is not None

    def prompts(self) -> list[str | None]:
        """The prompt of each caption asked: one per task, or the one prompt."""
        return [t.prompt for t in self.tasks] if self.tasks else [self.prompt]

    def for_task(self, task: CaptionTask) -> GenParams:
        """The parameters of one task's model call: its prompt, the rest shared."""
        return self.model_copy(update={"tasks": None, "prompt": task.prompt or None})

    def key(self) -> tuple[Any, ...]:
        """Batches only mix items whose parameters share this key."""
        key: tuple[Any, ...] = (self.max_length, self.num_beams, self.prompt or "")
        if self.tasks or self.sampling:  # older keys unchanged
            tasks = tuple((t.name, t.prompt or "") for t in self.tasks or ())
            key += (tasks, self.temperature, self.top_p, self.seed)
        if self.curation:
            key += (self.curation.model_dump_json(),)
        return key


class Source(BaseModel):
    """One image reference: exactly one of a local path, an http(s) URL, an object in a store (``s3://bucket/key``,
    ``gs://...``), or inline base64 bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)] | None = None
    url: Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)] | None = None
    #: An object URI, read through fsspec under the operator's allowed prefixes (never credentials in it).
    uri: Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)] | None = None
    b64: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [name for name in ("path", "url", "uri", "b64") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("a source needs exactly one of 'path', 'url', 'uri' or 'b64'")
        return self

    @property
    def kind(self) -> Literal["path", "url", "uri", "b64"]:
        if self.path is not None:
            return "path"
        return "url" if self.url is not None else "uri" if self.uri is not None else "b64"

    @property
    def ref(self) -> str:
        """The reference as one string: a path, a URL, or ``b64:<sha1>`` for inline bytes."""
        if self.b64 is not None:
            digest = hashlib.sha1()
            for start in range(0, len(self.b64), 1 << 16):  # in slices: no second copy of a huge payload
                digest.update(self.b64[start : start + (1 << 16)].encode())
            return "b64:" + digest.hexdigest()
        return self.path or self.url or self.uri or ""

    def decode_b64(self, max_bytes: int) -> bytes:
        """The inline bytes, checked against a size cap by length before anything is decoded, and after."""
        from common.errors import InvalidInput, TooLarge

        assert self.b64 is not None
        if len(self.b64) > 4 * -(-max_bytes // 3):  # the longest text max_bytes can encode to, padding included
            raise TooLarge(f"inline image is {len(self.b64)} base64 characters, over {max_bytes} bytes decoded")
        try:
            data = base64.b64decode(self.b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"b64 is not valid base64: {exc}") from exc
        if len(data) > max_bytes:
            raise TooLarge(f"inline image is {len(data)} bytes, over {max_bytes}")
        return data

    @classmethod
    def parse(cls, text: str) -> Source:
        """A source from one string as users write it: http(s) URLs, other ``scheme://`` strings are objects in a
        store, everything else is a path."""
        if is_url(text):
            return cls(url=text)
        if is_object_uri(text):
            return cls(uri=text)
        return cls(path=text)


#: Schemes of the references workers fetch over HTTP; every other reference is a path.
URL_SCHEMES = ("http://", "https://")


def is_url(text: str) -> bool:
    """Whether a reference is an http(s) URL (case-insensitive scheme), as opposed to a path."""
    return text[:8].lower().startswith(URL_SCHEMES)


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
    """One item of a chunk: its id in the job, and its source, parsed once here at the edge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(min_length=1, max_length=64)]
    src: Source

    @field_validator("src", mode="before")
    @classmethod
    def _parse_src(cls, value: object) -> object:
        # On the wire a path or URL travels as a bare string (see wire_source).
        if isinstance(value, str):
            if not value or len(value) > MAX_REF_CHARS:
                raise ValueError(f"a reference must be 1 to {MAX_REF_CHARS} characters")
            return Source.parse(value)
        return value

    def wire(self) -> str | dict[str, Any]:
        """The compact form the producer sends: the bare reference when the id derives from it."""
        if self.src.b64 is None and self.id == item_id(self.src.ref):
            return self.src.ref
        return {"id": self.id, "src": wire_source(self.src)}


class ChunkMessage(BaseModel):
    """Payload of ``captioner.caption_chunk.v1``: items of one ledger job, captioned with one set of params.

    An item is ``{"id", "src"}``, or just the reference string when its id is ``item_id(ref)`` (what the
    producer sends: a third fewer bytes per pending item in Redis).
    """

    model_config = ConfigDict(extra="forbid")

    job_id: JobId
    items: Annotated[list[ChunkItem], Field(min_length=1, max_length=MAX_ITEMS_PER_MESSAGE)]
    params: GenParams = GenParams()

    @field_validator("items", mode="before")
    @classmethod
    def _bare_refs(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"id": item_id(v), "src": v} if isinstance(v, str) else v for v in value]
        return value


#: What a container is: a WebDataset tar shard, a Parquet row group, a slice of an Arrow file, a shard of a 🤗 dataset.
ContainerKind = Literal["tar", "parquet", "arrow", "hf"]


#: Names of WebDataset tar shards (plain or gzipped).
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")


class ContainerSpec(BaseModel):
    """A container of images whose members a worker discovers by reading it once, sequentially.

    ``ref`` is the file (a path, an http(s) URL or an object URI) or, for ``hf``, the dataset (a folder or a hub
    id). Members become items whose reference is ``<ref>#<key>`` (``hf:<ref>/<split>#<key>``) and whose id derives
    from it, so the same member is the same item on every run.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ContainerKind
    ref: Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)]
    #: The image column (Parquet, Arrow, hf).
    column: str | None = None
    #: Parquet: the row group; hf: the shard index (of ``parts``).
    part: int | None = Field(None, ge=0)
    parts: int | None = Field(None, ge=1)
    #: Arrow: the rows [start, stop).
    start: int | None = Field(None, ge=0)
    stop: int | None = Field(None, ge=0)
    #: hf: the split, and whether to download the dataset whole instead of streaming it.
    split: str | None = None
    download: bool = False

    def json_key(self) -> str:
        return self.model_dump_json(exclude_defaults=True)

    @property
    def id(self) -> str:
        """Deterministic: the same container of the same job is recorded once."""
        return item_id(self.json_key())

    def member_ref(self, key: str) -> str:
        base = f"hf:{self.ref}/{self.split or 'train'}" if self.kind == "hf" else self.ref
        return f"{base}#{key}"


class ContainerMessage(BaseModel):
    """Payload of ``captioner.caption_container.v1``: caption the members of one container of a ledger job.

    The message names the container; the worker reads its spec from the ledger, where the producer recorded it,
    so a message cannot point a worker at anything the job does not hold.
    """

    model_config = ConfigDict(extra="forbid")

    job_id: JobId
    container: Annotated[str, Field(min_length=1, max_length=64)]
    params: GenParams = GenParams()


class CaptionRequest(BaseModel):
    """Payload of ``captioner.caption.v1``: one image (a Source, or a plain path/URL string)."""

    model_config = ConfigDict(extra="forbid")

    source: Source | Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)]
    params: GenParams = GenParams()

    def src(self) -> Source:
        return source_from_wire(self.source)


class CaptionManyRequest(BaseModel):
    """Payload of ``captioner.caption_many.v1``: up to 10,000 images, results in the same order.

    Workers take fewer per call (``CAPTIONER_MAX_LIST_ITEMS``): a call still running when the visibility timeout
    passes is delivered again and captioned twice. Larger lists are jobs.
    """

    model_config = ConfigDict(extra="forbid")

    sources: Annotated[
        list[Source | Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)]],
        Field(min_length=1, max_length=MAX_ITEMS_PER_MESSAGE),
    ]
    params: GenParams = GenParams()


class TrainRequest(BaseModel):
    """Payload of ``captioner.train.v1``: fine-tune on a dataset; the job's progress lives in the ledger."""

    model_config = ConfigDict(extra="forbid")

    job_id: JobId
    # A local imagefolder (metadata.jsonl/.csv/.parquet), a JSONL/CSV manifest, or a hub dataset id; with from_job,
    # "job:<id>" when not given.
    dataset: Annotated[str, Field(max_length=MAX_REF_CHARS)] = ""
    column: str | None = None
    text_column: str | None = None
    # Hub datasets stream (rows read as training needs them); True downloads the whole dataset into the cache.
    download: bool = False
    # TrainConfig fields to override (base_model, learning_rate, epochs, batch_size, max_steps, ...).
    config: dict[str, Any] = Field(default_factory=dict)
    promote: bool = False
    # Promote only when this metric is no worse than the current version's.
    require_no_worse: str | None = None
    # With require_no_worse: score the new and the current version on this dataset first and compare them there
    # (without it, the new version's training-time score must share the current one's evaluation data).
    gate_dataset: Annotated[str | None, Field(max_length=MAX_REF_CHARS)] = None
    #: Train on the captions of this caption job instead of a dataset (a teacher's captions: distillation).
    from_job: JobId | None = None
    #: With from_job: the task whose captions to learn (default: the rows' caption, or its correction).
    task: str | None = None
    #: With from_job: only the rows a reviewer corrected or accepted, not every ok row.
    reviewed_only: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> TrainRequest:
        if self.from_job is None and (self.task is not None or self.reviewed_only):
            raise ValueError("task and reviewed_only choose rows of a job: give from_job too")
        if self.from_job is not None and not self.dataset:
            self.dataset = f"job:{self.from_job}"  # what the training job's name and version metadata show
        if not self.dataset:
            raise ValueError("give a dataset, or from_job (a caption job whose captions to learn)")
        return self


class EvaluateRequest(BaseModel):
    """Payload of ``captioner.evaluate.v1``: score a model version on a dataset with generated captions."""

    model_config = ConfigDict(extra="forbid")

    version: Annotated[str, Field(min_length=1, max_length=256)]
    dataset: Annotated[str, Field(min_length=1, max_length=MAX_REF_CHARS)]
    column: str | None = None
    text_column: str | None = None
    max_samples: int | None = Field(None, ge=1)
    max_length: int = Field(50, ge=2, le=512)


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
    #: Caption quality flags: empty, truncated (cut at max_length), repetition (see model.flags).
    flags: list[str] | None = None
    #: Set on errors that may pass on a later attempt (timeouts, 5xx, out of memory).
    transient: bool | None = None
    #: Speed profile the caption was made with: "exact", or "fast:<pieces in use>" (e.g. "fast:sdpa,compile").
    profile: str | None = None
    #: The model family that made the caption ("blip", "florence-2", "llava"...); absent for GIT, the default family.
    family: str | None = None
    #: The caption was reused from an earlier item with the same image bytes, model version and parameters.
    reused: bool | None = None
    #: Columns of the source row that travel to the export (Parquet and dataset sources).
    extra: dict[str, Any] | None = None
    #: Mean log-probability of the caption's tokens (<= 0; nearer 0: surer), where the decoder measured it.
    confidence: float | None = None
    #: Every task's caption by task name, in the tasks' order (jobs and calls with ``params.tasks``); the first is
    #: also ``caption``.
    captions: dict[str, str] | None = None
    #: CLIPScore of the caption (``params.curation.score``): 100 * max(cos(image, caption), 0).
    clip_score: float | None = None
    #: Best of N: every candidate's CLIPScore in sampling order (the kept caption has the highest) and the seed
    #: the image's candidates were sampled with.
    candidates: list[float] | None = None
    sample_seed: int | None = None
    #: A near-duplicate of this item of the job (or of ``duplicate_job``): not captioned, its caption copied when
    #: known, else resolved at export.
    duplicate_of: str | None = None
    duplicate_job: str | None = None
    #: Stage timings in milliseconds: load (fetch, decode, preprocess this image), infer (the model batch it ran in).
    #: Single calls return them; ledger rows leave them out (the worker's log line and metrics carry them per chunk).
    timings: dict[str, float] = Field(default_factory=dict)
    finished_at: float | None = None


def caption_of(row: dict[str, Any], task: str | None = None) -> str | None:
    """The caption a dataset takes from an ok row: the chosen task's (None when the row has none for it); without a
    task, or for the first task, the reviewer's correction when there is one (corrections are of ``caption``, the
    first task's), else the model's caption."""
    captions = row.get("captions") or {}
    if task is None or (captions and next(iter(captions)) == task):
        text = row.get("corrected") or row.get("caption")
    else:
        text = captions.get(task)
    return None if text is None else str(text)


def parse_message(model: type[BaseModel], payload: object) -> BaseModel:
    """Validate a task payload, turning pydantic's error into our named ``InvalidMessage``."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "payload"
        raise InvalidMessage(f"{model.__name__}: {where}: {first.get('msg')} ({exc.error_count()} error(s))") from None
