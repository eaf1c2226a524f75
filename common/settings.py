"""One settings object read from the environment (prefix ``CAPTIONER_``); every knob, its default, one comment.

Nothing else in the project reads ``os.environ``: code receives a ``Settings`` (or a part of it) from its caller.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, IPvAnyNetwork, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.errors import ConfigError

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"

#: Pillow format names we decode; anything else (EPS would start Ghostscript) is refused unopened.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
#: Bytes per pixel one image decode may hold at its peak: the decoded image and its RGB copy, 4 bytes per pixel
#: each in Pillow. Decoders that need more (WebP, progressive JPEG) get a proportionally smaller pixel allowance,
#: so no decode passes its budget (media/images.py, docs/faults.md).
DECODE_BYTES_PER_PIXEL = 8
#: Working memory of one decode besides its images: a conversion band, decoder tables.
DECODE_OVERHEAD_BYTES = 16 << 20


def _split_list(value: object) -> object:
    """Accept JSON-ish lists from pydantic and plain ``a,b`` or ``a:b`` strings from a shell."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            import json

            return json.loads(text)
        sep = "," if "," in text else os.pathsep
        return [part.strip() for part in text.split(sep) if part.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of broker, ledger, worker, images and generation. Env: ``CAPTIONER_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="CAPTIONER_", extra="ignore", populate_by_name=True)

    # --- connections ----------------------------------------------------------------------------
    # Celery broker; Celery's own CELERY_BROKER_URL is honoured when ours is unset.
    broker_url: SecretStr = Field(
        SecretStr(DEFAULT_REDIS), validation_alias=AliasChoices("CAPTIONER_BROKER_URL", "CELERY_BROKER_URL")
    )
    # Celery result backend (single-image service calls read results here); defaults to the broker.
    result_backend: SecretStr | None = Field(
        None, validation_alias=AliasChoices("CAPTIONER_RESULT_BACKEND", "CELERY_RESULT_BACKEND")
    )
    # Where the job ledger lives; defaults to the broker's Redis. Give it its own DB in production.
    redis_url: SecretStr | None = None
    # Keep the job ledger in PostgreSQL instead (postgresql://user:password@host/db): for jobs larger than Redis
    # memory. Unset: the ledger is the Redis at redis_url. Redis still carries the queues.
    ledger_url: SecretStr | None = None
    # Prefix of every ledger key, so several deployments (or test runs) can share one Redis.
    key_prefix: str = "captioner"
    # CA bundle for rediss:// URLs. Without it (or an explicit cert_reqs) rediss:// is refused.
    redis_ssl_ca_certs: Path | None = None
    # Certificate check for rediss:// ("required" unless you really mean otherwise).
    redis_ssl_cert_reqs: Literal["required", "optional", "none"] | None = None
    # Seconds before ledger keys of a finished job expire; 0 keeps them until deleted.
    ledger_ttl_s: int = Field(0, ge=0)

    # --- queues ---------------------------------------------------------------------------------
    # Queue of bulk caption work (the chunks of ledger jobs).
    caption_queue: str = "captions"
    # Queue of single and list calls from services (caption.v1, caption_many.v1). Caption workers take from it
    # before the bulk queue, so a service's one image never waits behind an archive. Empty: <caption_queue>-now.
    interactive_queue: str = ""
    # Queue of fine-tune and evaluate jobs, consumed by training workers only.
    training_queue: str = "training"
    # Seconds a delivered, unacked caption message may stay unacked before Redis hands it to another
    # worker. Must exceed the time a prefetched chunk waits plus the time it takes; lower = faster
    # recovery after a crash, too low = a slow chunk runs twice (harmless: writes are idempotent).
    visibility_timeout_s: int = Field(300, ge=5)
    # Seconds between sweeps that give back messages of dead workers (kombu's default is ~100 s).
    unacked_restore_interval_s: int = Field(10, ge=1)
    # Seconds Celery keeps single-call results in the result backend (the ledger is the record).
    result_expires_s: int = Field(86400, ge=60)

    # --- the model ------------------------------------------------------------------------------
    # Hub id (e.g. microsoft/git-base), a local directory written by save_pretrained, or @current /
    # @<version> for the model store's promoted or a named version.
    model: str = "microsoft/git-base"
    # Directory of versioned models written by fine-tuning (see `captioner models`).
    model_store: Path | None = None
    # Seconds between checks of the store's promoted version by workers serving @current.
    model_poll_s: float = Field(5.0, gt=0)
    # Seconds a training job's lock outlives its runner's last heartbeat; then another worker resumes it.
    train_lock_ttl_s: int = Field(60, ge=3)
    # Processes of a fine-tune on a training worker (data parallel): one per GPU, or CPU processes where there
    # is no GPU; at most the worker's GPUs (its CPU cores without). A job's num_processes overrides it.
    train_processes: int = Field(1, ge=1, le=1024)
    # Hub revision (branch, tag or commit); ignored for local directories.
    model_revision: str | None = None
    # cuda, cuda:1, cpu, or auto (CUDA when present).
    device: str = "auto"
    # float32, bfloat16, float16, or auto (fp16/bf16 on GPU, bf16 on CPUs with native support, else fp32).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Greedy decoder: fast (model/fastgen.py, HF's exact ids), hf (transformers generate), auto (fast if able).
    decoder: Literal["auto", "fast", "hf"] = "auto"
    # Attention in the image encoder: eager is transformers' own for GIT (exact: captions equal HF's greedy
    # output); sdpa is PyTorch's fused kernel, the same math rounded differently in bf16/fp16: faster (about
    # 20% of the encoder on a CPU), and a caption can differ where two tokens nearly tie (bench/ reports how often).
    encoder_attention: Literal["eager", "sdpa"] = "eager"
    # Speed profile: exact (captions equal transformers' greedy output in the same dtype) or fast (per device,
    # the pieces that measured faster at a small, measured cost in held-out WER; bench/README.md).
    profile: Literal["exact", "fast"] = "exact"
    # Speed pieces switched on (name or +name) or off (-name) on top of the profile, comma separated:
    # sdpa, compile, int8, cudagraphs, draft (model/profiles.py); checked when a worker starts.
    pieces: str = ""
    # Directory where torch.compile keeps compiled code, so a restarted worker reuses it (empty: torch's own,
    # under /tmp). Only used with the compile piece.
    compile_cache_dir: Path | None = None
    # Share of the GPU's memory this worker's allocator may take (1: all); below 1 when workers share a GPU.
    cuda_memory_fraction: float = Field(1.0, gt=0, le=1)

    # CPU threads torch may use for one worker (0: torch's default, one per core). Lower it when several
    # workers or other busy processes share the cores: oversubscribed threads spin and crawl.
    torch_threads: int = Field(0, ge=0, le=1024)

    # --- captions from an OpenAI-compatible server (vLLM, SGLang, TGI, transformers serve, Ollama) ---------
    # Base URL of the server's OpenAI API, the part before /chat/completions (usually ending in /v1), e.g.
    # http://127.0.0.1:8000/v1. Set: workers caption through it, and CAPTIONER_MODEL is the name the server
    # serves (GET {URL}/models lists them); unset: the model runs in the worker. The operator's own configuration,
    # so it may be loopback or private; credentials go in endpoint_api_key, never in the URL.
    endpoint_url: str = ""
    # Sent as "Authorization: Bearer <key>"; OPENAI_API_KEY is honoured when ours is unset. Never written to the
    # ledger, rows, logs or exports.
    endpoint_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("CAPTIONER_ENDPOINT_API_KEY", "OPENAI_API_KEY")
    )
    # Requests a worker process keeps in flight at once (the server batches them itself).
    endpoint_concurrency: int = Field(8, ge=1, le=1024)
    # Seconds for one request, connecting, sending the image and the whole answer included. A slow answer is a
    # transient `timeout` row, sent again later (up to max_attempts).
    endpoint_timeout_s: float = Field(120.0, gt=0)
    # Quick retries of a request the server refused for now (429, 5xx) or whose connection failed, with a backoff
    # of 0.5 s doubling (or the server's Retry-After, up to 30 s); then the row is transient and sent again later.
    endpoint_retries: int = Field(3, ge=0, le=20)
    # The instruction sent with each image when a job gives no prompt (a job's --prompt replaces it); rows record
    # the prompt that was sent.
    endpoint_prompt: str = Field("Describe this image in one sentence.", min_length=1, max_length=2000)
    # Images go inline as JPEG data URLs, re-encoded from the decoded pixels: at most this many bytes (shrunk until
    # they fit) ...
    endpoint_image_bytes: int = Field(4 * 1024 * 1024, ge=4096)
    # ... and at most this many pixels on the longest side (0: as decoded). Servers resize to their model's input.
    endpoint_image_side: int = Field(2048, ge=0)
    # Largest answer read from the server; a longer one is an endpoint_error row.
    endpoint_response_bytes: int = Field(1024 * 1024, ge=1024)

    # --- batching -------------------------------------------------------------------------------
    # Most images in one generate call.
    max_batch_size: int = Field(32, ge=1, le=4096)
    # Longest wait (ms) of a partial batch for more images while none are known to be coming (0: a lone request
    # runs at once). Images of messages already in hand are waited for by fill_wait_ms instead.
    max_wait_ms: int = Field(0, ge=0, le=60_000)
    # Longest wait (ms) of a partial batch while images of messages in hand are still being fetched or decoded:
    # a chunk's first batch would otherwise hold only the few images decoded first, and calls that arrive
    # together share one batch. Never below max_wait_ms.
    fill_wait_ms: int = Field(200, ge=0, le=60_000)
    # Messages a worker process works on at once (threads); their images share batches.
    concurrency: int = Field(4, ge=1, le=256)
    # Extra messages each thread reserves ahead (Celery prefetch multiplier).
    prefetch_multiplier: int = Field(1, ge=1, le=64)
    # Threads fetching and decoding images while the model generates.
    decode_threads: int = Field(4, ge=1, le=256)
    # Of those, how many decode and preprocess at once while the model generates (CPU work; fetching is not
    # limited by it, and while the model waits for images every thread decodes). 0: automatic, 1 where the model
    # runs on the CPU (its threads use every core: more decoders preempt them, and the model's threads then wait on
    # each other), decode_threads elsewhere.
    decode_concurrency: int = Field(0, ge=0, le=256)
    # Image references per queue message when the producer enqueues a job.
    chunk_size: int = Field(64, ge=1, le=10_000)
    # Most chunk messages `captioner enqueue` leaves waiting in the caption queue; past it the producer waits for
    # workers to catch up (0: no limit). Bounds the broker's memory for archives of any size (about 7 KB a chunk).
    max_queued_chunks: int = Field(50_000, ge=0)
    # Attempts per item before it is recorded as poison.
    max_attempts: int = Field(3, ge=1, le=100)
    # Caption the same image bytes once per model version and parameters, across items and jobs: workers look
    # each image's digest up in the ledger before decoding it (a scraped archive holds many duplicates). Each
    # remembered caption costs about 100 bytes of ledger memory. Rows of reused captions say "reused": true.
    reuse_captions: bool = False
    # The CLIP checkpoint of jobs asking `--score clip` (and `--near-duplicates clip`) without naming one: a model
    # store name, a directory or a hub id (safetensors only). Loaded at start when set, once per process.
    clip_model: str | None = None
    # Seconds a model version's remembered captions live after the last one was added.
    reuse_ttl_s: int = Field(7 * 86400, ge=60)
    # Most images in one captioner.caption_many.v1 call. A call must end well inside the visibility timeout, or it
    # is delivered again and captioned twice: keep this below half the timeout times the worker's images per
    # second (`captioner doctor` compares). Larger lists go as jobs (captioner enqueue, JobClient).
    max_list_items: int = Field(256, ge=1, le=10_000)

    # --- generation defaults (a job may override; every result records what was used) ------------
    max_length: int = Field(50, ge=2, le=512)
    num_beams: int = Field(1, ge=1, le=16)

    # --- image inputs ---------------------------------------------------------------------------
    # Local paths are read only under these directories, and objects only under these object-store prefixes
    # (s3://bucket/prefix, gs://bucket), comma separated (os.pathsep too when no prefix is given). Empty: none.
    allowed_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # fsspec protocols object URIs may use (s3, gs; r2 and MinIO are s3 with an endpoint). file:// never: local
    # files go through allowed_roots. Credentials and endpoints come from each library's own configuration.
    object_store_protocols: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["s3", "gs"])
    # Largest container (WebDataset shard, Parquet or Arrow file) a worker reads: the bytes of the file (one over
    # http(s) is fetched whole into memory; local and object-store ones are streamed), and a shard's tar bytes after
    # decompression (a 1 MB .tar.gz can stand for gigabytes); members keep max_image_bytes.
    max_container_bytes: int = Field(1 << 30, ge=1024)
    # Seconds a worker reads one container message for, wherever the container lies (local, object store, http(s)).
    # Under the visibility timeout: a message still running past it is delivered to a second worker.
    container_timeout_s: float = Field(240.0, gt=0)
    # Let workers stream 🤗 datasets named by hub id (they reach the hub's network); folders are read under
    # allowed_roots either way.
    hub_datasets: bool = False
    # Largest encoded image accepted, from any source.
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # Largest broker message a worker decodes; a larger one is dropped (logged, counted) before its JSON is decoded.
    # Ours stay under it: a full chunk of 4,096-character references is about 55 MB, an inline image at
    # max_image_bytes about 57 MB (base64 twice: the source, then kombu's body encoding).
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    # Largest decoded image (width x height); kept below Pillow's own bomb limit on purpose.
    max_image_pixels: int = Field(64_000_000, ge=1)
    # Pillow formats that may be opened.
    allowed_formats: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_FORMATS))
    # Decode JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the model's input size: several
    # times cheaper for large photos, but the pixels differ slightly from a full decode, so a caption can too
    # (bench/ reports how often). Off: the exact path, same pixels as transformers' own processor.
    jpeg_draft: bool = False
    # Seconds to open a connection to an image URL.
    url_connect_timeout_s: float = Field(5.0, gt=0)
    # Seconds for a whole URL fetch, redirects and body included.
    url_total_timeout_s: float = Field(20.0, gt=0)
    # Redirect hops followed (each one checked like the first URL).
    url_max_redirects: int = Field(5, ge=0, le=20)
    # Let URLs reach loopback, private and link-local addresses. Off: such URLs are refused unconnected.
    allow_private_urls: bool = False
    # Addresses or CIDR networks that URLs may reach although private (an internal image server), comma
    # separated. Checked against every resolved address on every hop; everything else private stays refused.
    url_allowed_networks: Annotated[list[IPvAnyNetwork], NoDecode] = Field(default_factory=list)

    # Seconds a worker keeps retrying a ledger write that Redis refuses (restarting, at maxmemory) before it
    # gives the chunk back; the message stays unacked meanwhile, so nothing is lost either way.
    write_retry_s: float = Field(60.0, ge=0)

    # Fault injection for drills and tests: batches larger than this fail as out of memory (0: off).
    fault_oom_above: int = Field(0, ge=0)
    # Fault injection: the worker process exits abruptly when it reaches an item whose reference contains
    # this text (a decoder segfault, the OOM killer). Empty: off.
    fault_kill_ref: str = ""

    # HMAC key that signs job-completion webhooks (X-Captioner-Signature); unset: unsigned.
    webhook_secret: SecretStr | None = None

    # --- review page (captioner review) ---------------------------------------------------------
    # Address the review page binds to. Anything but loopback needs review_token or review_user/password set.
    review_host: str = "127.0.0.1"
    # Port of the review page.
    review_port: int = Field(8765, ge=1, le=65535)
    # Bearer token for the review page: browsers open /login?token=..., API clients send Authorization: Bearer.
    review_token: SecretStr | None = None
    # Basic-auth user of the review page (with review_password).
    review_user: str | None = None
    # Basic-auth password of the review page (with review_user).
    review_password: SecretStr | None = None
    # Name stored with corrections and marks; empty: the basic-auth user when there is one, else "local".
    review_reviewer: str = ""
    # Folder the page writes reviewed exports and fine-tune datasets to; training workers must be able to read it.
    review_export_dir: Path | None = None
    # Bytes of thumbnails the page keeps in memory, least recently used dropped first.
    review_thumb_cache_bytes: int = Field(64 * 1024 * 1024, ge=0)

    # --- logging --------------------------------------------------------------------------------
    log_level: str = "INFO"
    # One JSON object per log line (for log shippers) instead of plain text.
    log_json: bool = False

    # --- metrics --------------------------------------------------------------------------------
    # Port of each worker's Prometheus endpoint (0: off). One worker per GPU on a host needs one port each.
    metrics_port: int = Field(9808, ge=0, le=65535)
    # Address the metrics endpoint binds to.
    metrics_addr: str = "0.0.0.0"

    #: The object-store prefixes of allowed_roots, normalised (see media.objects), apart from the local roots.
    _allowed_prefixes: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _split_roots(cls, data: object, handler: Any) -> Settings:
        # Object-store prefixes share CAPTIONER_ALLOWED_ROOTS with local roots, but must never become Paths
        # (Path("s3://b/p") would turn into a local folder): they are taken apart before the field is validated.
        prefixes: list[str] = []
        if isinstance(data, dict) and "allowed_roots" in data:
            raw = data["allowed_roots"]
            if isinstance(raw, str) and "://" in raw and not raw.strip().startswith("["):
                raw = [part.strip() for part in raw.split(",") if part.strip()]
            if isinstance(raw, list | tuple):
                prefixes = [str(r) for r in raw if "://" in str(r)]
                data = {**data, "allowed_roots": [r for r in raw if "://" not in str(r)]}
        settings = handler(data)
        if prefixes:
            from common.uris import normalise_prefix

            settings._allowed_prefixes = tuple(normalise_prefix(p, settings.object_store_protocols) for p in prefixes)
        elif isinstance(data, Settings):
            settings._allowed_prefixes = data._allowed_prefixes
        return settings  # type: ignore[no-any-return]

    @field_validator("allowed_roots", "allowed_formats", "object_store_protocols", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("object_store_protocols")
    @classmethod
    def _protocols(cls, value: list[str]) -> list[str]:
        from common.uris import check_protocols

        return check_protocols(value)

    @field_validator("url_allowed_networks", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        # Commas or spaces only: the os.pathsep fallback of _split_list (":") would cut IPv6 addresses apart.
        if isinstance(value, str) and not value.strip().startswith("["):
            return value.replace(",", " ").split()
        return _split_list(value)

    @field_validator("allowed_formats")
    @classmethod
    def _upper(cls, value: list[str]) -> list[str]:
        return [v.upper() for v in value]

    @field_validator("allowed_roots")
    @classmethod
    def _resolve_roots(cls, value: list[Path]) -> list[Path]:
        return [Path(v).expanduser().resolve() for v in value]

    @field_validator("ledger_url")
    @classmethod
    def _postgres_only(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value():
            scheme = value.get_secret_value().split("://", 1)[0]
            if scheme not in ("postgresql", "postgres"):
                raise ConfigError(f"CAPTIONER_LEDGER_URL must be a postgresql:// URL, not {scheme}://")
        return value

    @model_validator(mode="after")
    def _tls_fails_closed(self) -> Settings:
        for url in (self.broker_url_str, self.result_backend_str, self.redis_url_str):
            if url.startswith("rediss://") and self.redis_ssl_cert_reqs is None and self.redis_ssl_ca_certs is None:
                raise ConfigError(
                    "rediss:// needs CAPTIONER_REDIS_SSL_CA_CERTS or CAPTIONER_REDIS_SSL_CERT_REQS; "
                    "without them the Redis client would skip certificate checks"
                )
        return self

    @model_validator(mode="after")
    def _review_basic_auth_pairs(self) -> Settings:
        if (self.review_user is None) != (self.review_password is None):
            raise ConfigError("set both CAPTIONER_REVIEW_USER and CAPTIONER_REVIEW_PASSWORD, or neither")
        return self

    def gen_params(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A job's generation parameters (GenParams fields): ``given`` over this deployment's defaults. The one place
        they are filled in, for the CLI, the job client and the worker (a message from elsewhere may leave some out)."""
        return {"max_length": self.max_length, "num_beams": self.num_beams, **(given or {})}

    @property
    def interactive_queue_name(self) -> str:
        return self.interactive_queue or f"{self.caption_queue}-now"

    @property
    def caption_queues(self) -> tuple[str, str]:
        """What caption workers consume, in the order they take from: interactive first, then bulk."""
        return (self.interactive_queue_name, self.caption_queue)

    @property
    def queues(self) -> tuple[str, str, str]:
        """Every queue of this deployment: the two caption queues, then the training queue."""
        return (*self.caption_queues, self.training_queue)

    @property
    def allowed_prefixes(self) -> tuple[str, ...]:
        """The object-store prefixes of CAPTIONER_ALLOWED_ROOTS, normalised (``s3://bucket/prefix/``)."""
        return self._allowed_prefixes

    # Plain-string views, so callers never pass a SecretStr to a client by accident.
    @property
    def decode_budget_bytes(self) -> int:
        """Most memory one image decode may hold: the pixel cap at DECODE_BYTES_PER_PIXEL, the encoded bytes
        twice (read, then copied by some decoders) and the working memory."""
        return self.max_image_pixels * DECODE_BYTES_PER_PIXEL + 2 * self.max_image_bytes + DECODE_OVERHEAD_BYTES

    @property
    def image_memory_bytes(self) -> int:
        """Worst case of the decode threads together: every one decoding the largest image allowed."""
        return self.decode_threads * self.decode_budget_bytes

    @property
    def broker_url_str(self) -> str:
        return self.broker_url.get_secret_value()

    @property
    def result_backend_str(self) -> str:
        return self.result_backend.get_secret_value() if self.result_backend else self.broker_url_str

    @property
    def ledger_url_str(self) -> str:
        return self.ledger_url.get_secret_value() if self.ledger_url else ""

    @property
    def redis_url_str(self) -> str:
        return self.redis_url.get_secret_value() if self.redis_url else self.broker_url_str


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment (or the ones given to ``use_settings``)."""
    return _override[0] if _override else Settings()


def use_settings(settings: Settings) -> None:
    """Make ``settings`` the process's settings (the CLI does this once, before anything reads them)."""
    get_settings.cache_clear()
    _override.clear()
    _override.append(settings)


_override: list[Settings] = []
