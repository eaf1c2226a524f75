"""`captioner doctor` and `captioner config`: is this deployment reachable, safe and serving? No torch."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from pydantic import SecretStr

from common.connections import queue_depths, settings_client
from common.memory import machine_memory_bytes
from common.settings import Settings
from common.store import ModelStore

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Check:
    name: str
    level: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "level": self.level, "detail": self.detail}


def mask_url(url: str) -> str:
    """redis://user:secret@host/0 -> redis://user:****@host/0."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6 keeps its brackets
    netloc = f"{user}:****@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


#: Secret settings that are connection URLs: shown with user and host, password masked. Every other secret
#: (a webhook key, and any secret added later) is masked whole, judged by its field rather than its text.
URL_SECRETS = frozenset({"broker_url", "result_backend", "redis_url", "ledger_url"})


def effective_settings(settings: Settings) -> dict[str, Any]:
    """Every setting with its effective value, secrets masked, keyed by environment variable."""
    out: dict[str, Any] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = mask_url(value.get_secret_value()) if name in URL_SECRETS else "****"
        elif isinstance(value, list):
            value = ",".join(map(str, value))
        elif value is not None and not isinstance(value, bool | int | float | str):
            value = str(value)
        out[f"CAPTIONER_{name.upper()}"] = value
    # Object-store prefixes live beside local roots in one variable (no credential can be in them: refused at start).
    out["CAPTIONER_ALLOWED_ROOTS"] = ",".join([*map(str, settings.allowed_roots), *settings.allowed_prefixes])
    out["CAPTIONER_RESULT_BACKEND"] = mask_url(settings.result_backend_str)
    out["CAPTIONER_REDIS_URL"] = mask_url(settings.redis_url_str)
    return out


def run_checks(settings: Settings, app: Any) -> list[Check]:
    checks: list[Check] = []
    broker = _connect("broker", settings, settings.broker_url_str, checks)
    redis_roles = [("broker", settings.broker_url_str, broker)]
    if not settings.ledger_url_str:  # the ledger is in Redis (with PostgreSQL, Redis carries only the queues)
        redis_roles.append(
            ("ledger", settings.redis_url_str, _connect("ledger", settings, settings.redis_url_str, checks))
        )
    servers: set[tuple[str | None, int | None]] = set()
    for role, url, client in redis_roles:
        server = (urlsplit(url).hostname, urlsplit(url).port)
        if client is not None and server not in servers:  # one server's checks once, even with two DBs on it
            servers.add(server)
            checks += _redis_safety(role, client)
            checks.append(_redis_access(role, settings, url, client))
    if broker is not None:
        depths = queue_depths(broker, settings.queues)
        checks.append(Check("queues", OK, ", ".join(f"{q}: {n} waiting" for q, n in depths.items())))
        checks += _workers(settings, app, depths[settings.training_queue])
    if settings.ledger_url_str:
        checks.append(_postgres_ledger(settings))
    checks += _config(settings)
    return checks


def _postgres_ledger(settings: Settings) -> Check:
    """The PostgreSQL ledger answers, and how much it holds."""
    from common.errors import CaptionerError
    from ledger import ledger_from_settings

    where = mask_url(settings.ledger_url_str)
    try:
        ledger = ledger_from_settings(settings)
        try:
            ledger.ping()
            size = ledger.bytes_used()
        finally:
            ledger.close()
    except CaptionerError as exc:
        return Check("ledger reachable", FAIL, f"{where}: {exc}")
    return Check("ledger reachable", OK, f"PostgreSQL {where}, {size / 2**20:.1f} MiB in its tables")


def _connect(role: str, settings: Settings, url: str, checks: list[Check]) -> redis.Redis | None:
    client = settings_client(settings, url)  # carries the rediss:// certificate options
    try:
        client.ping()
    except redis.RedisError as exc:
        checks.append(Check(f"{role} reachable", FAIL, f"{mask_url(url)}: {exc}"))
        return None
    checks.append(Check(f"{role} reachable", OK, mask_url(url)))
    return client


def _redis_safety(role: str, client: redis.Redis) -> list[Check]:
    try:
        conf = {**client.config_get("appendonly"), **client.config_get("maxmemory-policy")}
    except redis.RedisError as exc:  # CONFIG is often disabled by ACL in hardened setups
        return [Check(f"{role} persistence", WARN, f"cannot read CONFIG ({exc}); make sure appendonly is yes")]
    out = []
    if conf.get("appendonly") == "yes":
        out.append(Check(f"{role} persistence", OK, "appendonly yes"))
    else:
        out.append(Check(f"{role} persistence", FAIL, "appendonly no: a Redis restart loses queued work and jobs"))
    policy = conf.get("maxmemory-policy", "noeviction")
    if policy == "noeviction":
        out.append(Check(f"{role} eviction", OK, "noeviction"))
    else:
        out.append(Check(f"{role} eviction", FAIL, f"maxmemory-policy {policy} may silently drop queue or ledger keys"))
    return out


def _redis_access(role: str, settings: Settings, url: str, client: redis.Redis) -> Check:
    """Warn when anyone who reaches Redis may use it: no password or ACL user, and listening beyond loopback."""
    name, parts = f"{role} access", urlsplit(url)
    hint = "set a password or an ACL user (docs/operations.md, Hardening Redis)"
    open_to_all = _answers_without_auth(settings, url) if parts.password or parts.username else True
    if open_to_all is None:
        return Check(name, WARN, "cannot tell whether Redis requires a password")
    if not open_to_all:
        return Check(name, OK, "a password or ACL user is required")
    if not _is_loopback(parts.hostname or "127.0.0.1"):
        return Check(
            name, WARN, f"no password, and reached at {parts.hostname}: anyone on that network may use it; {hint}"
        )
    bind, protected = _config_value(client, "bind"), _config_value(client, "protected-mode")
    if bind is None:  # CONFIG refused: unknown, not a failure
        return Check(name, WARN, f"no password; cannot read CONFIG bind, so where it listens is unknown; {hint}")
    outside = [a for a in bind.split() if not _is_loopback(a.lstrip("-"))]
    if not outside:
        return Check(name, OK, f"no password, loopback only (bind {bind})")
    if protected == "yes":
        return Check(name, OK, f"no password; bind {bind}, but protected-mode refuses remote clients")
    return Check(name, WARN, f"no password, and listening beyond loopback (bind {bind}); {hint}")


def _answers_without_auth(settings: Settings, url: str) -> bool | None:
    """Does this Redis serve a client that sends no credentials? None when the probe itself fails."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    probe = settings_client(settings, urlunsplit(parts._replace(netloc=netloc)))
    try:
        probe.ping()
        return True
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError):
        return False
    except redis.RedisError as exc:
        return False if "DENIED" in str(exc) else None
    finally:
        probe.close()


def _config_value(client: redis.Redis, key: str) -> str | None:
    try:
        return client.config_get(key).get(key)
    except redis.RedisError:
        return None


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:  # "*", a host name: not provably loopback
        return False


def _workers(settings: Settings, app: Any, training_waiting: int) -> list[Check]:
    """Caption and training workers, told apart by the queues they consume."""
    queues = app.control.inspect(timeout=2.0).active_queues() or {}
    names = {h: {q.get("name") for q in qs or []} for h, qs in queues.items()}
    training = sorted(h for h, n in names.items() if settings.training_queue in n)
    hosts = sorted(h for h, n in names.items() if settings.caption_queue in n or h not in training)
    # Only the caption workers are asked, and the answer ends at their last reply rather than at the timeout.
    replies = (
        app.control.broadcast("captioner_info", reply=True, timeout=5.0, destination=hosts, limit=len(hosts))
        if hosts
        else []
    )
    info = {host: i for reply in replies or [] for host, i in reply.items()}
    caption = {h: info.get(h, {}) for h in hosts}
    out = []
    if not caption:
        out.append(Check("caption workers", FAIL, "no caption worker answered (captioner worker starts one)"))
    else:
        versions = ", ".join(
            f"{h}: {i.get('model_version') or 'loading'}" + (f" ({i['profile']})" if i.get("profile") else "")
            for h, i in caption.items()
        )
        out.append(Check("caption workers", OK, f"{len(caption)} online; {versions}"))
        fallbacks = [
            f"{h}: {piece} off ({why})" for h, i in caption.items() for piece, why in (i.get("fallbacks") or {}).items()
        ]
        if fallbacks:  # asked for, but the device or model could not use them: those parts run exact
            out.append(Check("speed pieces", WARN, "; ".join(fallbacks)))
    if training:
        out.append(Check("training workers", OK, f"{len(training)} online: {', '.join(training)}"))
    elif training_waiting:
        detail = (
            f"none online, {training_waiting} job(s) waiting in {settings.training_queue} (captioner worker --training)"
        )
        out.append(Check("training workers", WARN, detail))
    else:
        out.append(Check("training workers", OK, "none online (none needed: the training queue is empty)"))
    for host, i in caption.items():
        if "image_memory_bytes" in i:  # what the worker itself may need (its own settings) and has
            need, threads = i["image_memory_bytes"], i["decode_threads"]
            out.append(image_memory(need, threads, i.get("memory_bytes"), worker=host))
        if i.get("max_list_items") and i.get("items") and i.get("infer_s"):
            out.append(list_calls(host, i["max_list_items"], i["items"] / i["infer_s"], i["visibility_timeout_s"]))
    if model := _served_versions(settings, caption):
        out.append(model)
    return out


def _served_versions(settings: Settings, caption: dict[str, dict[str, Any]]) -> Check | None:
    """Workers started with @current should serve the store's promoted version (they poll for it)."""
    # captioner_info names the worker's CAPTIONER_MODEL when it reports one; else assume ours (one env).
    following = {h: i for h, i in caption.items() if (i.get("model") or settings.model) == "@current"}
    if not following:
        return None
    if settings.model_store is None:
        return Check("model version", WARN, "workers follow @current; set CAPTIONER_MODEL_STORE here to compare")
    current = ModelStore(settings.model_store).current()
    if current is None:
        return Check(
            "model version", WARN, f"workers follow @current but {settings.model_store} has no promoted version"
        )
    served = {h: i.get("model_version") for h, i in following.items()}
    stale = {h: v for h, v in served.items() if v is not None and v != current.version}  # None: still loading
    if stale:
        listed = ", ".join(f"{h} serves {v}" for h, v in stale.items())
        detail = (
            f"{listed}; the store's current is {current.version}. Workers switch within CAPTIONER_MODEL_POLL_S "
            f"({settings.model_poll_s:g}s); if this persists, the worker's log says why it could not load it"
        )
        return Check("model version", WARN, detail)
    return Check("model version", OK, f"{len(following)} worker(s) on @current serve {current.version}")


def image_memory(need: int, threads: int, have: int | None, *, worker: str = "") -> Check:
    """The worst case of the decode threads (each decoding the largest image allowed) against a machine's memory.

    Over the machine's memory is a failure (the OOM killer ends the worker); over half of it a warning, since the
    model, its batches and the images waiting for them need the rest.
    """
    name, where = (f"image memory {worker}", f"on {worker}") if worker else ("image memory", "here")
    budget = f"{threads} decode thread(s) x the largest image allowed = {need / 2**30:.1f} GiB"
    fix = "lower CAPTIONER_DECODE_THREADS or CAPTIONER_MAX_IMAGE_PIXELS"
    if have is None:
        return Check(name, WARN, f"{budget}; cannot read the memory {where}")
    share = f"{budget} of {have / 2**30:.1f} GiB {where}"
    if need > have:
        return Check(name, FAIL, f"{share}: more than the machine has; {fix}")
    if need > have / 2:
        return Check(name, WARN, f"{share}: over half, beside the model and its batches; {fix}")
    return Check(name, OK, share)


def list_calls(worker: str, max_items: int, per_s: float, visibility_timeout_s: float) -> Check:
    """The largest list call at the worker's own speed (model time only, so a lower bound) against half its
    visibility timeout: a call still running when the timeout passes is delivered again and captioned twice."""
    took = max_items / per_s
    detail = (
        f"{max_items} images per caption_many call at {per_s:.1f} images/s (model time) take at least "
        f"{took:.0f}s; visibility timeout {visibility_timeout_s:g}s"
    )
    if took > visibility_timeout_s / 2:
        return Check(f"list calls {worker}", WARN, f"{detail}: lower CAPTIONER_MAX_LIST_ITEMS or raise the timeout")
    return Check(f"list calls {worker}", OK, detail)


def _config(settings: Settings) -> list[Check]:
    out = []
    if not settings.allowed_roots:
        out.append(Check("allowed roots", WARN, "CAPTIONER_ALLOWED_ROOTS is empty: workers refuse every local path"))
    if settings.allow_private_urls:
        out.append(Check("url guard", WARN, "CAPTIONER_ALLOW_PRIVATE_URLS lets image URLs reach internal services"))
    if settings.visibility_timeout_s < 60:
        out.append(Check("visibility timeout", WARN, f"{settings.visibility_timeout_s}s: slow chunks will run twice"))
    if settings.model.startswith("@") and settings.model_store is None:
        out.append(Check("model", FAIL, f"CAPTIONER_MODEL={settings.model} needs CAPTIONER_MODEL_STORE"))
    out.append(image_memory(settings.image_memory_bytes, settings.decode_threads, machine_memory_bytes()))
    if settings.fault_oom_above:
        out.append(Check("fault injection", WARN, f"CAPTIONER_FAULT_OOM_ABOVE={settings.fault_oom_above} is on"))
    return out
