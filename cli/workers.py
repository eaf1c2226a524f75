"""`captioner workers`: the fleet seen from outside: list workers, drain one for a rolling upgrade, and the backlog
per queue that autoscalers read (`captioner workers backlog --serve PORT` is the exporter KEDA's trigger queries)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import click

from cli.base import Fail, cli, emit, json_option, settings_of, shown

if TYPE_CHECKING:
    from celery import Celery

    from common.settings import Settings
    from runtime.queues import QueueCount


@cli.group()
def workers() -> None:
    """List workers, drain one (rolling upgrades), show or export the queues' backlog (autoscaling)."""


def _app(ctx: click.Context) -> Celery:
    from runtime.celery_app import create_app

    return create_app(settings_of(ctx))


def fleet(app: Celery, settings: Settings, timeout: float) -> list[dict[str, Any]]:
    """One row per worker that answers: node, host, kind, queues, model version, items done and items/s since start."""
    inspect = app.control.inspect(timeout=timeout)
    queues = {node: [q.get("name") for q in qs or []] for node, qs in (inspect.active_queues() or {}).items()}
    stats = inspect.stats() or {}
    nodes = sorted(set(queues) | set(stats))
    info: dict[str, Any] = {}
    draining: dict[str, Any] = {}
    if nodes:
        for command, into in (("captioner_info", info), ("captioner_draining", draining)):
            replies = app.control.broadcast(command, reply=True, timeout=timeout, destination=nodes, limit=len(nodes))
            into.update({node: answer for reply in replies or [] for node, answer in reply.items()})
    rows = []
    for node in nodes:
        st, inf, dr = stats.get(node) or {}, info.get(node) or {}, draining.get(node) or {}
        training = settings.training_queue in queues.get(node, []) or node.startswith("train@")
        uptime = float(st.get("uptime") or 0)
        items = inf.get("items") if not training else sum((st.get("total") or {}).values())
        state = "draining" if dr.get("draining") else "loading" if not training and not inf.get("loaded") else "serving"
        rows.append(
            {
                "node": node,
                "host": node.split("@", 1)[-1],
                "kind": "training" if training else "caption",
                "state": state,
                "queues": queues.get(node, []),
                "model_version": inf.get("model_version"),
                "items": items,
                "items_per_s": round(items / uptime, 2) if items is not None and uptime > 0 else None,
                "uptime_s": round(uptime),
                "in_hand": dr.get("in_hand"),
            }
        )
    return rows


@workers.command("list")
@click.option(
    "--timeout",
    type=click.FloatRange(0.1, 60),
    default=2.0,
    show_default=True,
    help="Seconds to wait for workers' answers.",
)
@json_option
@click.pass_context
def list_(ctx: click.Context, timeout: float, as_json: bool) -> None:
    """Every worker that answers: host, kind, model version, queues, items done and items/s since it started."""
    rows = fleet(_app(ctx), settings_of(ctx), timeout)

    def human() -> None:
        if not rows:
            click.echo("no worker answered (captioner worker starts one)")
            return
        click.echo(f"{'NODE':32} {'KIND':8} {'STATE':8} {'MODEL VERSION':24} {'QUEUES':24} {'ITEMS':>8} {'ITEMS/S':>8}")
        for r in rows:
            click.echo(
                f"{shown(r['node']):32} {r['kind']:8} {r['state']:8} {shown(r['model_version'] or '-'):24} "
                f"{shown(','.join(r['queues']) or '-'):24} {r['items'] if r['items'] is not None else '-':>8} "
                f"{r['items_per_s'] if r['items_per_s'] is not None else '-':>8}"
            )

    emit(as_json, rows, human)


@workers.command()
@click.argument("node")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the worker has exited.")
@click.option(
    "--timeout",
    type=click.FloatRange(1, 86_400),
    default=3600,
    show_default=True,
    help="Seconds to wait for it with --wait.",
)
@json_option
@click.pass_context
def drain(ctx: click.Context, node: str, wait: bool, timeout: float, as_json: bool) -> None:
    """Drain caption worker NODE (as `captioner workers list` names it): it stops consuming, finishes the messages it
    holds, then exits. Start its replacement (a new model version, a new release) before or after."""
    app = _app(ctx)
    replies = app.control.broadcast("captioner_drain", reply=True, timeout=5.0, destination=[node], limit=1) or []
    answer = next((a for reply in replies for n, a in reply.items() if n == node), None)
    if answer is None:
        raise Fail(f"no worker named {node!r} answered (`captioner workers list` names them)")
    if "error" in answer:
        raise Fail(
            f"{node} cannot be drained ({answer['error']}): only caption workers drain; stop a training "
            "worker with SIGTERM, which checkpoints its fine-tune and hands it to the next training worker"
        )
    started = time.monotonic()
    gone = not wait
    while wait and time.monotonic() - started < timeout:
        if not (app.control.ping(destination=[node], timeout=1.0) or []):
            gone = True
            break
        time.sleep(0.5)
    result = {"node": node, **answer, "exited": gone if wait else None}
    emit(
        as_json,
        result,
        lambda: click.echo(
            f"{node}: stopped consuming {', '.join(answer.get('queues') or []) or 'nothing'}, "
            f"{answer.get('in_hand', 0)} message(s) in hand" + ("; it has exited" if wait and gone else "")
        ),
    )
    if wait and not gone:
        raise Fail(f"{node} still answers after {timeout:g} s: it is finishing what it holds (it exits when done)")


def backlog_counts(app: Celery, settings: Settings) -> dict[str, QueueCount]:
    """Ready and reserved messages of the deployment's queues, read through the app's broker connection."""
    from runtime.queues import count_queues

    with app.connection_for_read() as conn:
        unacked = conn.transport_options.get("unacked_key", "unacked")
        return count_queues(conn.default_channel.client, settings.queues, unacked_key=unacked)


def training_jobs_running(settings: Settings) -> int:
    """Fine-tunes RUNNING in the ledger: being trained, or waiting for a training worker to resume them."""
    from common.messages import JobKind, JobState
    from ledger import ledger_from_settings

    ledger = ledger_from_settings(settings)
    try:
        return sum(1 for j in ledger.jobs(1000) if j.kind is JobKind.TRAIN and j.state is JobState.RUNNING)
    finally:
        ledger.close()


@workers.command()
@click.option(
    "--serve",
    "port",
    type=click.IntRange(1, 65535),
    help="Serve the figures for Prometheus on this port instead of printing them (read at each scrape).",
)
@click.option("--addr", default="0.0.0.0", show_default=True, help="Address --serve binds to.")
@json_option
@click.pass_context
def backlog(ctx: click.Context, port: int | None, addr: str, as_json: bool) -> None:
    """Per queue: messages ready (every priority's list), reserved by workers (unacked) and their sum, the backlog
    that autoscaling acts on; and the fine-tunes running."""
    app, settings = _app(ctx), settings_of(ctx)
    if port is not None:
        _serve(app, settings, port, addr)
        return
    counts = backlog_counts(app, settings)
    running = training_jobs_running(settings)
    data = {"queues": {q: c.as_dict() for q, c in counts.items()}, "training_jobs_running": running}

    def human() -> None:
        click.echo(f"{'QUEUE':24} {'READY':>8} {'RESERVED':>9} {'BACKLOG':>8}")
        for q, c in counts.items():
            click.echo(f"{shown(q):24} {c.ready:>8} {c.reserved:>9} {c.backlog:>8}")
        click.echo(f"training jobs running: {running}")

    emit(as_json, data, human)


def _serve(app: Celery, settings: Settings, port: int, addr: str) -> None:
    """The exporter: a registry of its own (only these figures), read at every scrape; exits 0 on SIGTERM."""
    import logging

    from prometheus_client import CollectorRegistry, start_http_server

    from runtime.queues import BacklogCollector

    log = logging.getLogger("captioner.backlog")

    def read() -> tuple[dict[str, QueueCount], int | None]:
        try:
            running: int | None = training_jobs_running(settings)
        except Exception as exc:  # the ledger unreachable: the queues are still worth serving
            log.warning("training jobs not counted: %s", exc)
            running = None
        return backlog_counts(app, settings), running

    backlog_counts(app, settings)  # a broker that does not answer is one line at start, not a silent endpoint
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BacklogCollector(read))  # type: ignore[arg-type]
    start_http_server(port, addr=addr, registry=registry)
    click.echo(f"serving the backlog of {', '.join(settings.queues)} on http://{addr}:{port}/metrics", err=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
