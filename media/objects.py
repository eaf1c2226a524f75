"""Objects in object storage (s3://, gs://, and fsspec protocols the operator enables): normalised URIs, allowed
prefixes, capped reads, streamed listings and uploads that appear whole or not at all.

Credentials and endpoints come only from each library's own configuration (``AWS_*`` variables and
``AWS_ENDPOINT_URL``, profiles, instance roles; ``GOOGLE_APPLICATION_CREDENTIALS``), never from messages or
settings, and errors never carry them. fsspec and its backends are imported on first use (extra ``cloud``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from common.errors import FetchError, FetchTimeout, Forbidden, ItemError, TooLarge
from common.uris import (  # noqa: F401  (the URI rules, re-exported for the store's callers)
    IMAGE_SUFFIXES,
    NEVER_PROTOCOLS,
    ObjectURI,
    check_protocols,
    is_object_uri,
    normalise_prefix,
    parse_uri,
    redact,
)


def _error(uri: str, exc: BaseException) -> ItemError:
    """A store's exception as a row's error: missing, refused, timed out, or another failure; no secret in it."""
    message = redact(" ".join(str(exc).split()) or type(exc).__name__)[:300]
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return FetchError(f"{uri}: no such object or bucket ({message})")
    if isinstance(exc, PermissionError) or name in ("NoCredentialsError", "PartialCredentialsError"):
        return FetchError(f"{uri}: the store refused access: {message}")
    if isinstance(exc, TimeoutError) or "Timeout" in name:
        return FetchTimeout(f"{uri}: the store did not answer in time ({message})", transient=True)
    if name in ("EndpointConnectionError", "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError"):
        return FetchError(f"{uri}: cannot reach the store: {message}", transient=True)
    return FetchError(f"{uri}: {name}: {message}")


@contextlib.contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """Our named errors for whatever the store's client raises (ItemErrors pass through)."""
    try:
        yield
    except ItemError:
        raise
    except ImportError as exc:
        raise FetchError(f"{uri}: object storage support is missing (pip install 'captioner[cloud]'): {exc}") from None
    except Exception as exc:  # botocore, aiohttp and fsspec raise many unrelated classes
        raise _error(uri, exc) from None


@dataclass(frozen=True)
class ObjectStore:
    """Which objects may be read or written (those under an allowed prefix, by enabled protocols), with a byte cap."""

    prefixes: tuple[str, ...]
    protocols: tuple[str, ...]
    max_bytes: int
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0
    _parsed: tuple[ObjectURI, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefixes", tuple(self.prefixes))
        object.__setattr__(self, "protocols", tuple(self.protocols))
        parsed = tuple(parse_uri(p, self.protocols) for p in self.prefixes)
        object.__setattr__(self, "_parsed", parsed)

    @classmethod
    def from_settings(cls, s: Any) -> ObjectStore:
        return cls(
            prefixes=tuple(s.allowed_prefixes),
            protocols=tuple(s.object_store_protocols),
            max_bytes=s.max_image_bytes,
            connect_timeout_s=s.url_connect_timeout_s,
            read_timeout_s=s.url_total_timeout_s,
        )

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON (``ObjectStore(**d)`` makes it again)."""
        return {
            "prefixes": list(self.prefixes),
            "protocols": list(self.protocols),
            "max_bytes": self.max_bytes,
            "connect_timeout_s": self.connect_timeout_s,
            "read_timeout_s": self.read_timeout_s,
        }

    # --- access ---------------------------------------------------------------------------------
    def place(self, text: str) -> ObjectURI:
        """The object ``text`` names, if it lies under an allowed prefix; Forbidden (or InvalidInput) otherwise."""
        uri = parse_uri(text, self.protocols)
        if not self._parsed:
            raise Forbidden(
                f"{uri} is not under an allowed prefix: object storage is off (put s3://bucket/prefix in "
                "CAPTIONER_ALLOWED_ROOTS)"
            )
        if not any(uri.under(p) for p in self._parsed):
            raise Forbidden(f"{uri} is outside the allowed prefixes ({', '.join(self.prefixes)})")
        return uri

    def filesystem(self, protocol: str) -> Any:
        return _filesystem(protocol, self.connect_timeout_s, self.read_timeout_s)

    # --- reading --------------------------------------------------------------------------------
    def read(self, text: str, max_bytes: int | None = None) -> bytes:
        """The bytes of one allowed object, at most ``max_bytes`` (the image cap by default)."""
        cap = self.max_bytes if max_bytes is None else max_bytes
        uri = self.place(text)
        with store_errors(str(uri)):
            fs = self.filesystem(uri.protocol)
            size = fs.size(uri.path)
            if size is not None and size > cap:
                raise TooLarge(f"{uri} is {size} bytes, over the limit of {cap}")
            with fs.open(uri.path, "rb") as fh:
                data = fh.read(cap + 1)
        if len(data) > cap:
            raise TooLarge(f"{uri} is over the limit of {cap} bytes")
        return bytes(data)

    @contextlib.contextmanager
    def open(self, text: str, *, block_size: int = 8 << 20, checked: bool = True) -> Iterator[IO[bytes]]:
        """A sequential reader of one allowed object (a shard, a Parquet file); errors as our named ones. Unchecked
        (the producer reading a file's metadata), any object of an enabled protocol."""
        uri = self.place(text) if checked else parse_uri(text, self.protocols)
        with store_errors(str(uri)):
            fs = self.filesystem(uri.protocol)
            fh = fs.open(uri.path, "rb", block_size=block_size)
        try:
            yield _Checked(fh, str(uri))  # type: ignore[misc]
        finally:
            with contextlib.suppress(Exception):
                fh.close()

    def size(self, text: str) -> int:
        uri = self.place(text)
        with store_errors(str(uri)):
            return int(self.filesystem(uri.protocol).size(uri.path))

    # --- listing --------------------------------------------------------------------------------
    def iter_objects(self, text: str, suffixes: tuple[str, ...] | None = None) -> Iterator[str]:
        """URIs of the objects under a prefix, recursively, in key order, page by page (never the whole listing in
        memory); only names ending in ``suffixes`` (lower case) when given. Needs no allowed prefix: the producer
        lists, and workers check every object they read."""
        uri = parse_uri(text, self.protocols)
        with store_errors(str(uri)):
            fs = self.filesystem(uri.protocol)
            pages = _s3_pages(fs, uri) if uri.protocol == "s3" else _walk_pages(fs, uri)
            for names in pages:
                for name in names:
                    if suffixes is None or name.lower().endswith(suffixes):
                        yield f"{uri.protocol}://{name}"

    def check_prefix(self, text: str) -> None:
        """FetchError unless the bucket exists and something lies under the prefix (one small listing)."""
        uri = parse_uri(text, self.protocols)
        with store_errors(str(uri)):
            fs = self.filesystem(uri.protocol)
            if uri.protocol == "s3":
                first = next(_s3_pages(fs, uri, page_size=1), [])
            else:
                first = fs.ls(uri.path.rstrip("/") or uri.bucket, detail=False)[:1] if fs.exists(uri.path) else []
            if not first and not (uri.key and fs.isfile(uri.path)):
                raise FileNotFoundError(f"nothing under {uri}")

    # --- writing --------------------------------------------------------------------------------
    def _target(self, text: str, checked: bool) -> ObjectURI:
        return self.place(text) if checked else parse_uri(text, self.protocols)

    def upload(self, local: str, text: str, *, overwrite: bool, checked: bool = True) -> None:
        """Put a complete local file at ``text`` (a single PUT, or a multipart upload committed only when whole): a
        failed upload leaves no object under the name. FileExistsError when it exists and ``overwrite`` is off.
        Unchecked: any object of an enabled protocol (an operator's export, with the operator's credentials)."""
        uri = self._target(text, checked)
        with store_errors(str(uri)):
            fs = self.filesystem(uri.protocol)
            if not overwrite and fs.exists(uri.path):
                raise FileExistsError(str(uri))
            fs.put_file(local, uri.path)

    def exists(self, text: str, *, checked: bool = True) -> bool:
        uri = self._target(text, checked)
        with store_errors(str(uri)):
            return bool(self.filesystem(uri.protocol).exists(uri.path))

    def remove(self, text: str, *, checked: bool = True) -> None:
        uri = self._target(text, checked)
        with store_errors(str(uri)), contextlib.suppress(FileNotFoundError):
            self.filesystem(uri.protocol).rm_file(uri.path)


class _Checked:
    """A store file whose read errors come out as our named ones (a shard read half-way, a reset connection)."""

    def __init__(self, fh: Any, uri: str) -> None:
        self._fh, self._uri = fh, uri

    def read(self, size: int = -1) -> bytes:
        with store_errors(self._uri):
            return bytes(self._fh.read(size))

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        with store_errors(self._uri):
            return int(self._fh.seek(offset, whence))

    def tell(self) -> int:
        return int(self._fh.tell())

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    @property
    def size(self) -> int:
        return int(self._fh.size)

    def close(self) -> None:
        self._fh.close()

    @property
    def closed(self) -> bool:
        return bool(self._fh.closed)


_FS_LOCK = threading.Lock()
_FILESYSTEMS: dict[tuple[str, float, float], Any] = {}


def _filesystem(protocol: str, connect_s: float, read_s: float) -> Any:
    """One fsspec filesystem per protocol and timeouts in this process, built with no credentials of ours."""
    key = (protocol, connect_s, read_s)
    with _FS_LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            import fsspec

            kwargs: dict[str, Any] = {}
            if protocol == "s3":
                # Listings are never cached (objects appear while a job runs); timeouts bound every request.
                kwargs = {
                    "use_listings_cache": False,
                    "config_kwargs": {
                        "connect_timeout": connect_s,
                        "read_timeout": read_s,
                        "retries": {"max_attempts": 3, "mode": "standard"},
                    },
                }
            fs = fsspec.filesystem(protocol, **kwargs)
            _FILESYSTEMS[key] = fs
        return fs


def _s3_pages(fs: Any, uri: ObjectURI, page_size: int = 1000) -> Iterator[list[str]]:
    """Object names under an S3 prefix, one ListObjectsV2 page (up to 1000 keys) at a time, in key order."""
    from fsspec.asyn import sync

    pages = fs._list_pages(
        "list_objects_v2", Bucket=uri.bucket, Prefix=uri.key, Delimiter="", MaxKeys=page_size, **fs.req_kw
    )
    while True:
        try:
            page = sync(fs.loop, pages.__anext__)
        except StopAsyncIteration:
            return
        names = [f"{uri.bucket}/{c['Key']}" for c in page.get("Contents", []) if not c["Key"].endswith("/")]
        if names or page_size == 1:
            yield names


def _walk_pages(fs: Any, uri: ObjectURI) -> Iterator[list[str]]:
    """Object names under a prefix of any other protocol, one folder at a time (sorted)."""
    for folder, dirs, files in fs.walk(uri.path, detail=False):
        dirs.sort()
        yield [f"{folder.rstrip('/')}/{name}" for name in sorted(files)]
