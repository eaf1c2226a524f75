"""`captioner doctor` and `captioner config`: is this deployment reachable, safe and serving? No torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from pydantic import SecretStr

from worker.settings import Settings

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
URL_SECRETS = frozenset({"broker_url", "result_backend", "redis_url"})


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
    out["CAPTIONER_RESULT_BACKEND"] = mask_url(settings.result_backend_str)
    out["CAPTIONER_REDIS_URL"] = mask_url(settings.redis_url_str)
    return out


def run_checks(settings: Settings, app: Any) -> list[Check]:
    checks: list[Check] = []
    broker = _connect("broker", settings.broker_url_str, checks)
    ledger = _connect("ledger", settings.redis_url_str, checks)
    for role, client in (("broker", broker), ("ledger", ledger)):
        if client is not None:
            checks += _redis_safety(role, client)
    if broker is not None:
        depths = {q: int(broker.llen(q)) for q in (settings.caption_queue, settings.training_queue)}
        checks.append(Check("queues", OK, ", ".join(f"{q}: {n} waiting" for q, n in depths.items())))
        checks.append(_workers(app))
    checks += _config(settings)
    return checks


def _connect(role: str, url: str, checks: list[Check]) -> redis.Redis | None:
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=5)
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


def _workers(app: Any) -> Check:
    from producer.jobs import workers_info

    info = workers_info(app, timeout=2.0)
    if not info:
        return Check("caption workers", FAIL, "no caption worker answered (captioner worker starts one)")
    versions = ", ".join(f"{host}: {i.get('model_version') or 'loading'}" for host, i in sorted(info.items()))
    return Check("caption workers", OK, f"{len(info)} online; {versions}")


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
    if settings.fault_oom_above:
        out.append(Check("fault injection", WARN, f"CAPTIONER_FAULT_OOM_ABOVE={settings.fault_oom_above} is on"))
    return out or [Check("settings", OK, "no known misconfiguration")]
