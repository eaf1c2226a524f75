"""Paths (b) and (c): real worker processes on a LocalRedis, timed from the first enqueue to the last result."""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.corpus import caption_tokens
from bench.naive_app import TASK, create_app
from bench.result import PathResult, proc_cpu_s
from common.errors import CaptionerError
from common.messages import TASK_CAPTION, GenParams
from common.settings import Settings
from producer.jobs import JobClient, workers_info
from producer.local import LocalRedis, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
#: The worker's one log line per chunk (worker/service.py), parsed for stage timings.
CHUNK_LINE = re.compile(
    r"chunk job=(?P<job>\S+) items=(?P<items>\d+) ok=\d+ error=(?P<error>\d+) skipped=\d+ (?:alone=\d+ )?"
    r"load_ms=(?P<load>[\d.]+) infer_ms=(?P<infer>[\d.]+) write_ms=(?P<write>[\d.]+) total_ms=(?P<total>[\d.]+)"
)
#: Generous: git-base in fp32 at batch 1 on a busy 2-core machine is about one image per second.
PER_IMAGE_TIMEOUT_S = 30


def _env_path() -> str:
    """PYTHONPATH for worker processes: the repository root first, so ``bench`` imports from any cwd."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def _worker_env(
    redis: LocalRedis, queue: str, model_dir: Path, image_dir: Path, dtype: str, batch: int, max_length: int
) -> dict[str, str]:
    return {
        "CAPTIONER_BROKER_URL": redis.url(0),
        "CAPTIONER_RESULT_BACKEND": redis.url(0),
        "CAPTIONER_REDIS_URL": redis.url(1),
        "CAPTIONER_KEY_PREFIX": "bench",
        "CAPTIONER_CAPTION_QUEUE": queue,
        "CAPTIONER_MODEL": str(model_dir),
        "CAPTIONER_DTYPE": dtype,
        "CAPTIONER_MAX_BATCH_SIZE": str(batch),
        "CAPTIONER_MAX_LENGTH": str(max_length),
        "CAPTIONER_ALLOWED_ROOTS": str(image_dir),
        "CAPTIONER_LOG_LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": _env_path(),
    }


def _stats(app: Any, name: str) -> dict[str, Any]:
    """The worker's batcher totals (batches, items, infer_s), through the ``captioner_info`` control command."""
    info = workers_info(app, timeout=3.0).get(name)
    if not info:
        raise CaptionerError(f"worker {name} did not answer captioner_info")
    return info


def _chunk_lines(log: Path, job_id: str) -> list[dict[str, float]]:
    rows = []
    for line in log.read_text(errors="replace").splitlines():
        m = CHUNK_LINE.search(line)
        if m and m["job"] == job_id:
            rows.append({k: float(m[k]) for k in ("items", "error", "load", "infer", "write", "total")})
    return rows


def _stages(enqueue_s: float, infer_s: float, chunks: list[dict[str, float]], n: int) -> dict[str, float]:
    """Per-image stage times of (b); the log-derived ones only when the worker's chunk lines were found."""
    stages = {"enqueue": enqueue_s * 1000 / n}
    if chunks:
        # Summed over decode threads, so it can exceed wall time: work done beside the model thread.
        stages["decode+preprocess (threads)"] = sum(c["load"] for c in chunks) / n
    stages["generate"] = infer_s * 1000 / n
    if chunks:
        stages["write"] = sum(c["write"] for c in chunks) / n
    return stages


class QueueRun:
    """(b) A real caption worker with the model loaded, and a JobClient; ``measure`` times one job end to end."""

    def __init__(
        self,
        redis: LocalRedis,
        model_dir: Path,
        image_dir: Path,
        *,
        dtype: str,
        batch_size: int,
        max_length: int,
        log: Path,
        extra_env: dict[str, str] | None = None,
        key: str = "b",
    ) -> None:
        self.key = key
        self.tag = uuid.uuid4().hex[:8]
        self.queue = f"bench-{self.tag}"
        self.dtype, self.batch_size, self.max_length = dtype, batch_size, max_length
        self.redis = redis
        env = _worker_env(redis, self.queue, model_dir, image_dir, dtype, batch_size, max_length)
        self.extra_env = dict(extra_env or {})
        self.worker = WorkerProcess({**env, **self.extra_env}, log=log)
        self.settings = Settings(
            broker_url=redis.url(0),
            result_backend=redis.url(0),
            redis_url=redis.url(1),
            key_prefix="bench",
            caption_queue=self.queue,
            max_length=max_length,
        )
        self.client: JobClient | None = None

    def start(self) -> QueueRun:
        self.worker.start()
        return self

    def ready(self, timeout: float, warm_up: list[Path]) -> None:
        """Wait for the model to be loaded, then run a small warm-up job (start-up is never timed)."""
        self.worker.wait_ready(timeout)
        self.client = JobClient(self.settings)
        self._job([str(p) for p in warm_up], kind="warm")

    def _job(self, refs: list[str], *, kind: str = "run") -> tuple[str, float, Any]:
        assert self.client is not None
        job_id = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
        started = time.time()
        report = self.client.enqueue(refs, job_id=job_id, params=GenParams(max_length=self.max_length))
        try:
            info = self.client.wait(job_id, timeout=60 + PER_IMAGE_TIMEOUT_S * len(refs), poll_s=0.02, on_tick=_noop)
        except CaptionerError as exc:
            raise CaptionerError(f"{exc}; worker log tail:\n{self.worker.log_tail()}") from None
        if info.ok != len(refs):
            raise CaptionerError(f"job {job_id}: {info.ok} of {len(refs)} captioned; see {self.worker.log_path}")
        # 'finished' is written by the worker in the same Lua call that records the last row.
        return job_id, (info.finished or time.time()) - started, report

    def measure(self, paths: list[Path], tokenizer: Any) -> PathResult:
        assert self.client is not None
        before = _stats(self.client.app, self.worker.name)
        cpu = _cpu(self.worker, self.redis)
        job_id, seconds, report = self._job([str(p) for p in paths])
        cpu = _cpu(self.worker, self.redis) - cpu
        after = _stats(self.client.app, self.worker.name)
        by_ref = {row["ref"]: row.get("caption") or "" for row in self.client.results(job_id)}
        captions = [by_ref.get(str(p), "") for p in paths]
        batches = after["batches"] - before["batches"]
        items = after["items"] - before["items"]
        chunks = _chunk_lines(self.worker.log_path, job_id)
        n = len(paths)
        return PathResult(
            key=self.key,
            images=n,
            seconds=seconds,
            batch_size=self.batch_size,
            dtype=after.get("dtype", self.dtype),
            mean_tokens=caption_tokens(tokenizer, captions),
            stages_ms=_stages(report.seconds, after["infer_s"] - before["infer_s"], chunks, n),
            extra={
                "cpu_ms_per_image": round(cpu * 1000 / n, 1),
                "max_batch_size": self.batch_size,
                "mean_batch": round(items / batches, 2) if batches else 0.0,
                "batches": batches,
                "messages": report.messages,
                "chunk_log_lines": len(chunks),
                "chunk_size": self.settings.chunk_size,
                "worker_concurrency": self.settings.concurrency,
                "worker_env": self.extra_env,
                "profile": after.get("profile"),
                "fallbacks": after.get("fallbacks"),
                "warm_up_s": after.get("warm_up_s"),
                "worker_log": str(self.worker.log_path),
            },
            captions=captions,
        )

    def latency(self, paths: list[Path], calls: int) -> dict[str, Any]:
        """One image at a time by task name, as a service at light load sends it: each call's wall time from
        send_task to its result, against the worker's own time for it (decode+preprocess, then its batch)."""
        assert self.client is not None
        app = self.client.app
        walls, worker_ms = [], []
        for i in range(calls):
            started = time.perf_counter()
            source = {"source": str(paths[i % len(paths)])}
            sent = app.send_task(TASK_CAPTION, kwargs=source, queue=self.settings.interactive_queue_name)
            row = sent.get(timeout=600, interval=0.002)
            walls.append((time.perf_counter() - started) * 1000)
            worker_ms.append(row["timings"]["load_ms"] + row["timings"]["infer_ms"])
        wait_ms = float(self.extra_env.get("CAPTIONER_MAX_WAIT_MS", self.settings.max_wait_ms))
        p50, batch_p50 = statistics.median(walls), statistics.median(worker_ms)
        return {
            "calls": calls,
            "p50_ms": round(p50, 1),
            "p95_ms": round(sorted(walls)[max(0, int(0.95 * calls) - 1)], 1),
            "worker_p50_ms": round(batch_p50, 1),
            "max_wait_ms": wait_ms,
            "bound_ms": round(wait_ms + batch_p50, 1),
            "overhead_p50_ms": round(p50 - batch_p50, 1),
        }

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.worker.terminate()


class NaiveWorker(WorkerProcess):
    """(c) ``celery -A bench.naive_app worker --pool=solo`` on its own queue; ready when Celery says so."""

    def __init__(self, redis: LocalRedis, *, log: Path) -> None:
        self.queue = f"naive-{uuid.uuid4().hex[:8]}"
        env = {
            "CELERY_BROKER_URL": redis.url(2),
            "CELERY_RESULT_BACKEND": redis.url(2),
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": _env_path(),
        }
        super().__init__(env, log=log)
        self.args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.naive_app",
            "worker",
            "--pool=solo",
            f"--queues={self.queue}",
            f"--hostname={self.name}",
            "--loglevel=INFO",
            "--without-mingle",
            "--without-gossip",
        ]
        self.app = create_app(redis.url(2), redis.url(2))
        self.redis = redis

    def measure(self, model_dir: Path, paths: list[Path], *, max_length: int, tokenizer: Any) -> PathResult:
        """One ``send_task`` per image, then wait for every result; a warm-up task loads the model first."""

        def send(path: Path) -> Any:
            kwargs = {"path": str(path), "model": str(model_dir), "max_length": max_length}
            return self.app.send_task(TASK, kwargs=kwargs, queue=self.queue)

        send(paths[0]).get(timeout=600)  # loads the model in the worker; not timed
        cpu, started = _cpu(self, self.redis), time.perf_counter()
        pending = [send(p) for p in paths]
        rows = [r.get(timeout=60 + PER_IMAGE_TIMEOUT_S * len(paths)) for r in pending]
        seconds, cpu = time.perf_counter() - started, _cpu(self, self.redis) - cpu
        captions = [row["caption"] for row in rows]
        stages = {k: sum(row["timings"][k] for row in rows) / len(rows) for k in rows[0]["timings"]}
        return PathResult(
            key="c",
            images=len(paths),
            seconds=seconds,
            batch_size=1,
            dtype="float32",
            mean_tokens=caption_tokens(tokenizer, captions),
            stages_ms={k.removesuffix("_ms"): v for k, v in stages.items()},
            extra={
                "cpu_ms_per_image": round(cpu * 1000 / len(paths), 1),
                "generated_tokens": round(sum(row["tokens"] for row in rows) / len(rows), 2),
                "worker_log": str(self.log_path),
            },
            captions=captions,
        )


def _noop(_: Any) -> None:
    pass


def _cpu(worker: WorkerProcess, redis: LocalRedis) -> float:
    """CPU seconds of everything on the path: the worker process, redis-server and this (client) process."""
    pids = [p.pid if p else None for p in (worker.proc, redis.proc)]
    return sum(proc_cpu_s(pid) for pid in pids) + time.process_time()
