"""The named errors callers act on: per-item error classes (rows, not crashes) and operator errors."""

from __future__ import annotations

from typing import ClassVar


class CaptionerError(Exception):
    """Base of every error this project raises on purpose; the message says what to do."""


# --- per-item errors: each becomes one result row with ``error_class = code`` -------------------


class ItemError(CaptionerError):
    """One input could not be captioned. Never fails its batch-mates."""

    code: ClassVar[str] = "item_error"
    #: Whether trying the same item again later may succeed (network blips, 5xx, OOM).
    transient: bool = False

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient


class InvalidInput(ItemError):
    """The item reference itself is malformed (bad base64, unknown kind, empty)."""

    code = "invalid_input"


class Forbidden(ItemError):
    """The reference points somewhere this worker may not read (outside allowed roots, private network)."""

    code = "forbidden"


class FetchError(ItemError):
    """The bytes could not be read: missing file, HTTP error, connection refused."""

    code = "fetch_error"


class FetchTimeout(ItemError):
    """The read did not finish within its deadline."""

    code = "timeout"
    transient = True


class TooLarge(ItemError):
    """Too many bytes or too many pixels for the configured limits."""

    code = "too_large"


class DecodeError(ItemError):
    """The bytes are not an image in an allowed format, or the image is corrupt."""

    code = "decode_error"


class EngineError(ItemError):
    """The model failed on this item even when run on its own."""

    code = "engine_error"


class EndpointError(ItemError):
    """The captioning server refused this image or answered something that is not a chat completion."""

    code = "endpoint_error"


class Cancelled(ItemError):
    """The job was cancelled before this item was captioned."""

    code = "cancelled"


class Poison(ItemError):
    """The item was attempted too many times (it kept failing or killing its worker)."""

    code = "poison"


ITEM_ERROR_CLASSES: tuple[type[ItemError], ...] = (
    InvalidInput,
    Forbidden,
    FetchError,
    FetchTimeout,
    TooLarge,
    DecodeError,
    EngineError,
    Cancelled,
    Poison,
    EndpointError,  # last: the ledger stores a row's error class as its index here
)
ITEM_ERROR_CODES: tuple[str, ...] = tuple(cls.code for cls in ITEM_ERROR_CLASSES)


# --- operator errors: the CLI prints these as one line and exits non-zero ----------------------


class ConfigError(CaptionerError):
    """A setting is missing, contradictory or unsafe."""


class BrokerUnavailable(CaptionerError):
    """Redis (broker or ledger) cannot be reached."""


class UnknownJob(CaptionerError):
    """No job with that id exists in the ledger."""


class SourceError(CaptionerError):
    """A source given to the producer cannot be read or expanded."""


class NothingToEnqueue(CaptionerError):
    """The sources expanded to zero items."""


class ModelLoadError(CaptionerError):
    """The model could not be loaded (missing, unsafe, or not a GIT checkpoint)."""


class UnsafeCheckpoint(ModelLoadError):
    """The checkpoint is not safetensors, or its safetensors file is truncated or tampered with."""


class InvalidMessage(CaptionerError):
    """A queue message does not match the contract (missing fields, wrong types, unknown version)."""


# --- review errors: the review page turns these into a 4xx; the CLI into one line ----------------


class UnknownItem(CaptionerError):
    """No item with that id in the job's manifest."""


class NotCaptioned(CaptionerError):
    """The item has no caption to review yet (pending, failed or cancelled): caption it first."""


class InvalidReview(CaptionerError):
    """A review request the ledger refuses: an empty or over-long correction, an unknown mark, a bad cursor."""
