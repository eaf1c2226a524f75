"""The ``captioner`` command group and what every command shares: settings from options and the environment, one
line per user mistake (never a traceback), JSON or human output. Never imports torch."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from common.errors import CaptionerError, ConfigError
from common.messages import GenParams

if TYPE_CHECKING:  # the CLI imports these lazily, so `captioner --help` stays fast
    from common.settings import Settings
    from producer.jobs import JobClient


EXIT_ERROR = 1

#: The modules each extra brings (import names), checked before a command that needs them starts: a producer-only
#: install (`pip install captioner`) gets one line naming the extra instead of a traceback from deep inside.
_WORKER = ("torch", "transformers", "safetensors", "PIL", "httpx2", "prometheus_client")
EXTRAS: dict[str, tuple[str, ...]] = {
    "worker": _WORKER,
    "train": (*_WORKER, "jiwer", "sacrebleu", "rouge_score", "accelerate", "tensorboard"),
    "review": ("PIL", "httpx2", "starlette", "uvicorn", "jinja2", "cachetools"),
}


def require_extra(extra: str, what: str) -> None:
    """Fail in one line when ``extra``'s modules are not installed: ``what`` needs them."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except ImportError:  # a finder that knows it is not there
            return True

    missing = [m for m in EXTRAS[extra] if absent(m)]
    if missing:
        raise Fail(f"{what} needs its extra: pip install 'captioner[{extra}]' (missing: {', '.join(missing)})")


class Group(click.Group):
    """Turns the errors a user can cause into one clear line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except BrokenPipeError:  # `captioner export ... -o - | head`: the reader left, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0) from None
        except CaptionerError as exc:
            raise Fail(f"{exc}") from None
        except OSError as exc:  # an export target not writable, a disk full: the user's environment, not a bug
            where = f"{exc.filename}: " if exc.filename else ""
            raise Fail(f"{where}{exc.strerror or exc}") from None
        except Exception as exc:
            message = infra_message(exc)
            if message is None:
                raise
            raise Fail(message) from None


class Fail(click.ClickException):
    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.secho(f"error: {self.format_message()}", err=True, fg="red")


def infra_message(exc: Exception) -> str | None:
    """Broker and settings failures, said plainly; None for anything that is a bug."""
    import redis
    from kombu.exceptions import OperationalError
    from pydantic import ValidationError

    if isinstance(exc, redis.exceptions.ResponseError) and "OOM" in str(exc):
        return f"Redis is out of memory (maxmemory reached); nothing more was written: {exc}"
    if isinstance(exc, redis.RedisError | OperationalError | ConnectionError):
        return f"cannot reach Redis: {exc} (check CAPTIONER_BROKER_URL / CAPTIONER_REDIS_URL)"
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"bad setting {'.'.join(map(str, first['loc']))}: {first['msg']}"
    return None


@dataclass
class CliState:
    """What every command shares: the settings, and a job client made on first use (so --help and `config` never
    touch the broker)."""

    settings: Settings
    _client: JobClient | None = None

    @property
    def client(self) -> JobClient:
        if self._client is None:
            from producer.jobs import JobClient

            self._client = JobClient(self.settings)
        return self._client


def state_of(ctx: click.Context) -> CliState:
    state = ctx.find_root().obj
    assert isinstance(state, CliState), "the cli group sets its state before any command runs"
    return state


def settings_of(ctx: click.Context) -> Settings:
    return state_of(ctx).settings


def client_of(ctx: click.Context) -> JobClient:
    return state_of(ctx).client


def emit(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json_text(data))
    else:
        human()


def json_text(data: Any) -> str:
    """JSON with text readable as it is, except what a terminal may act on: C0 controls (JSON escapes them), and C1
    controls (U+009B opens an escape sequence on 8-bit terminals), separators and format characters (bidi
    overrides), which JSON would leave raw and are written as ``\\uXXXX`` escapes of the same text."""
    text = json.dumps(data, ensure_ascii=False, default=str)
    return "".join(ch if ch.isascii() or ch.isprintable() else json.dumps(ch)[1:-1] for ch in text)


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")


def shown(text: object) -> str:
    """Text from the ledger as a terminal should show it: job names, ids, references and error messages are
    anyone's input, so control and format characters (escape sequences, bidi overrides) print as escapes."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--broker-url", envvar="CAPTIONER_BROKER_URL", help="Celery broker (redis://...).")
@click.option("--redis-url", envvar="CAPTIONER_REDIS_URL", help="Ledger Redis; defaults to the broker.")
@click.option("--key-prefix", envvar="CAPTIONER_KEY_PREFIX", help="Prefix of every ledger key.")
@click.pass_context
def cli(ctx: click.Context, broker_url: str | None, redis_url: str | None, key_prefix: str | None) -> None:
    """Caption very large image archives with a GIT model on a Celery + Redis queue."""
    from pydantic import ValidationError

    from common.settings import Settings, use_settings

    overrides = {"broker_url": broker_url, "redis_url": redis_url, "key_prefix": key_prefix}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v})
    except ValidationError as exc:
        raise Fail(infra_message(exc) or str(exc)) from None
    except ConfigError as exc:
        raise Fail(str(exc)) from None
    use_settings(settings)
    ctx.obj = CliState(settings)


# --- enqueue ---------------------------------------------------------------------------------------


def gen_params(
    settings: Settings, max_length: int | None, num_beams: int | None, prompt: str | None, **more: Any
) -> GenParams:
    """The generation parameters of a command's options; ``more``: further GenParams fields (tasks, sampling)."""
    from pydantic import ValidationError

    try:
        given = {k: v for k, v in {"max_length": max_length, "num_beams": num_beams}.items() if v is not None}
        extra = {k: v for k, v in more.items() if v is not None}
        return GenParams(**settings.gen_params(given), prompt=prompt, **extra)
    except ValidationError as exc:
        first = exc.errors()[0]
        # A field's own error names it; one about the fields together (no room for a caption) names both.
        where = first["loc"][0] if first["loc"] else "max_length/--prompt/--task"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise click.BadParameter(message, param_hint=f"--{str(where).replace('_', '-')}") from None


def job_id_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A --job-id the worker will accept, or a usage error now (before anything is written)."""
    from common.messages import check_job_id

    try:
        return None if value is None else check_job_id(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
