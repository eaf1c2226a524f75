"""One settings object read from the environment (prefix ``CAPTIONER_``); every knob, its default, one comment.

Nothing else in the project reads ``os.environ``: code receives a ``Settings`` (or a part of it) from its caller.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, IPvAnyNetwork, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.errors import ConfigError

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"

#: Pillow format names we decode; anything else (EPS would start Ghostscript) is refused unopened.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


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
    # Hub revision (branch, tag or commit); ignored for local directories.
    model_revision: str | None = None
    # cuda, cuda:1, cpu, or auto (CUDA when present).
    device: str = "auto"
    # float32, bfloat16, float16, or auto (fp16/bf16 on GPU, bf16 on CPUs with native support, else fp32).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Greedy decoder: fast (worker/fastgen.py, HF's exact ids), hf (transformers generate), auto (fast if able).
    decoder: Literal["auto", "fast", "hf"] = "auto"
    # Attention in the image encoder: eager is transformers' own for GIT (exact: captions equal HF's greedy
    # output); sdpa is PyTorch's fused kernel, the same math rounded differently in bf16/fp16: faster (about
    # 20% of the encoder on a CPU), and a caption can differ where two tokens nearly tie (bench/ reports how often).
    encoder_attention: Literal["eager", "sdpa"] = "eager"
    # Speed profile: exact (captions equal transformers' greedy output in the same dtype) or fast (per device,
    # the pieces that measured faster at a small, measured cost in held-out WER; bench/README.md).
    profile: Literal["exact", "fast"] = "exact"
    # Speed pieces switched on (name or +name) or off (-name) on top of the profile, comma separated:
    # sdpa, compile, int8, cudagraphs, draft (worker/profiles.py); checked when a worker starts.
    pieces: str = ""
    # Directory where torch.compile keeps compiled code, so a restarted worker reuses it (empty: torch's own,
    # under /tmp). Only used with the compile piece.
    compile_cache_dir: Path | None = None
    # Share of the GPU's memory this worker's allocator may take (1: all); below 1 when workers share a GPU.
    cuda_memory_fraction: float = Field(1.0, gt=0, le=1)

    # CPU threads torch may use for one worker (0: torch's default, one per core). Lower it when several
    # workers or other busy processes share the cores: oversubscribed threads spin and crawl.
    torch_threads: int = Field(0, ge=0, le=1024)

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
    # Image references per queue message when the producer enqueues a job.
    chunk_size: int = Field(64, ge=1, le=10_000)
    # Attempts per item before it is recorded as poison.
    max_attempts: int = Field(3, ge=1, le=100)

    # --- generation defaults (a job may override; every result records what was used) ------------
    max_length: int = Field(50, ge=1, le=512)
    num_beams: int = Field(1, ge=1, le=16)

    # --- image inputs ---------------------------------------------------------------------------
    # Local paths are read only under these directories (comma or os.pathsep separated). Empty: none.
    allowed_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # Largest encoded image accepted, from any source.
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1024)
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

    # --- logging --------------------------------------------------------------------------------
    log_level: str = "INFO"
    # One JSON object per log line (for log shippers) instead of plain text.
    log_json: bool = False

    # --- metrics --------------------------------------------------------------------------------
    # Port of each worker's Prometheus endpoint (0: off). One worker per GPU on a host needs one port each.
    metrics_port: int = Field(9808, ge=0, le=65535)
    # Address the metrics endpoint binds to.
    metrics_addr: str = "0.0.0.0"

    @field_validator("allowed_roots", "allowed_formats", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

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

    @model_validator(mode="after")
    def _tls_fails_closed(self) -> Settings:
        for url in (self.broker_url_str, self.result_backend_str, self.redis_url_str):
            if url.startswith("rediss://") and self.redis_ssl_cert_reqs is None and self.redis_ssl_ca_certs is None:
                raise ConfigError(
                    "rediss:// needs CAPTIONER_REDIS_SSL_CA_CERTS or CAPTIONER_REDIS_SSL_CERT_REQS; "
                    "without them the Redis client would skip certificate checks"
                )
        return self

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

    # Plain-string views, so callers never pass a SecretStr to a client by accident.
    @property
    def broker_url_str(self) -> str:
        return self.broker_url.get_secret_value()

    @property
    def result_backend_str(self) -> str:
        return self.result_backend.get_secret_value() if self.result_backend else self.broker_url_str

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
