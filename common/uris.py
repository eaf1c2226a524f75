"""Object-store URIs as text: which references name an object, the enabled protocols, normalised buckets, keys and
allowed prefixes, and redaction of credentials from a store's messages. Plain string rules; the store itself is
``media.objects``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import ConfigError, Forbidden, InvalidInput, ItemError

#: Protocols that never go through object storage: local files have allowed roots, URLs the SSRF guard.
NEVER_PROTOCOLS = frozenset({"file", "local", "http", "https"})
#: Other names of the same protocol, as fsspec knows them.
_ALIASES = {"gcs": "gs", "s3a": "s3"}
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.S)
# S3 and GCS bucket names: letters, digits, dots, dashes, underscores. No ':' or '@' (credentials), no '/'.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,221}")
#: Object names treated as images when a prefix is listed (the worker's formats).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# What may give a credential away in a store's message: access key ids, 40-character secrets, signed URL parts.
_SECRETS = re.compile(
    r"(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{16}|(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"
    r"|(?:Signature|Credential|X-Amz-[A-Za-z-]+|access_token|sig)=[^&\s\"'<>]+"
)


def is_object_uri(text: str) -> bool:
    """Whether a reference is ``scheme://...`` with a scheme other than http(s): an object in a store."""
    match = _URI.match(text[:64])
    return match is not None and match.group(1).lower() not in ("http", "https")


def redact(text: str) -> str:
    """A store's message without anything that looks like a credential."""
    return _SECRETS.sub("****", text)


def check_protocols(protocols: list[str]) -> list[str]:
    """The enabled protocols, lower-cased; ConfigError for one that must never be enabled."""
    out = [_ALIASES.get(p.strip().lower(), p.strip().lower()) for p in protocols if p.strip()]
    bad = sorted(set(out) & NEVER_PROTOCOLS)
    if bad:
        raise ConfigError(
            f"CAPTIONER_OBJECT_STORE_PROTOCOLS cannot enable {', '.join(bad)}: local files are read under "
            "CAPTIONER_ALLOWED_ROOTS and URLs through the URL guard"
        )
    return out


@dataclass(frozen=True)
class ObjectURI:
    """One object (or prefix) in a store: protocol, bucket and key, normalised."""

    protocol: str
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{self.protocol}://{self.bucket}/{self.key}"

    @property
    def path(self) -> str:
        """The path fsspec takes (no protocol)."""
        return f"{self.bucket}/{self.key}"

    def under(self, prefix: ObjectURI) -> bool:
        """Whether this object lies under ``prefix`` (a whole bucket, or a folder of it)."""
        if (self.protocol, self.bucket) != (prefix.protocol, prefix.bucket):
            return False
        return not prefix.key or self.key.startswith(prefix.key)


def parse_uri(text: str, protocols: list[str] | tuple[str, ...]) -> ObjectURI:
    """``text`` as an ObjectURI: an enabled protocol, a plain bucket name, no ``.``/``..`` segments, no chaining,
    no control characters; InvalidInput or Forbidden otherwise."""
    match = _URI.fullmatch(text)
    if not match:
        raise InvalidInput(f"{text[:80]!r} is not an object URI (protocol://bucket/key)")
    protocol = _ALIASES.get(match.group(1).lower(), match.group(1).lower())
    if protocol in NEVER_PROTOCOLS:
        raise Forbidden(f"{protocol}:// is never read as an object (local files go under CAPTIONER_ALLOWED_ROOTS)")
    if protocol not in protocols:
        enabled = ", ".join(protocols) or "none"
        raise Forbidden(f"{protocol}:// is not an enabled object store (CAPTIONER_OBJECT_STORE_PROTOCOLS: {enabled})")
    if "::" in text:
        raise InvalidInput("chained fsspec URLs (a::b) are refused")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise InvalidInput("object URI contains control characters")
    bucket, _, key = match.group(2).partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise InvalidInput(f"{bucket[:80]!r} is not a bucket name (credentials never go in URIs)")
    if any(part in (".", "..") for part in key.split("/")):
        raise InvalidInput(f"object key {key[:80]!r} has '.' or '..' segments")
    return ObjectURI(protocol, bucket, key)


def normalise_prefix(text: str, protocols: list[str] | tuple[str, ...]) -> str:
    """An allowed prefix as compared: ``protocol://bucket/`` or ``protocol://bucket/folder/`` (ConfigError if bad)."""
    try:
        uri = parse_uri(text.strip(), protocols)
    except ItemError as exc:
        raise ConfigError(f"CAPTIONER_ALLOWED_ROOTS: {exc}") from None
    key = uri.key.strip("/")
    return f"{uri.protocol}://{uri.bucket}/" + (key + "/" if key else "")
