"""Load: one job of 100,000 items through one worker, exactly once, with flat memory (slow: make test-full)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import redis

from producer.jobs import JobClient
from producer.local import LocalRedis, WorkerProcess
from tests.conftest import settings_from, tally

N = int(os.environ.get("LOAD_ITEMS", "100000"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the whole 100,000 items: longer than the suite's 300 s per test on a busy machine
def test_one_hundred_thousand_items_exactly_once_with_flat_worker_memory(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    from training.synthetic import make_shapes

    originals = [p for p, _ in make_shapes(session_root / "load-src", 50, seed=9, size=32)]
    folder = session_root / "load"
    folder.mkdir(exist_ok=True)
    refs = []
    for i in range(N):  # hard links: N distinct paths, 50 distinct images, no disk to speak of
        path = folder / f"{i:06d}.png"
        if not path.exists():
            os.link(originals[i % len(originals)], path)
        refs.append(str(path))
    with LocalRedis() as server:
        env = {
            **worker_env,
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_RESULT_BACKEND": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(0),
            "CAPTIONER_MAX_LENGTH": "6",
            "CAPTIONER_MAX_BATCH_SIZE": "64",
            "CAPTIONER_CHUNK_SIZE": "256",
            "CAPTIONER_TORCH_THREADS": "2",
        }
        r = redis.Redis.from_url(server.url(0))
        client = JobClient(settings_from(env))
        before = r.info("memory")["used_memory"]
        started = time.perf_counter()
        client.enqueue(refs, job_id="job-load")
        enqueue_rate = N / (time.perf_counter() - started)
        per_item = (r.info("memory")["used_memory"] - before) / N
        samples: list[tuple[float, int, int]] = []  # (seconds, items done, worker RSS)
        with WorkerProcess(env, log=tmp_path / "w.log") as proc:
            proc.wait_ready()
            stop = threading.Event()
            t0 = time.monotonic()

            def sample() -> None:
                while not stop.wait(2.0):
                    info = client.status("job-load")
                    samples.append((time.monotonic() - t0, info.ok + info.error, rss_bytes(proc.proc.pid)))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            info = client.wait("job-load", timeout=3600, poll_s=2.0, on_tick=lambda _: None)
            stop.set()
            sampler.join()
            seconds = time.monotonic() - t0
        rows = list(client.results("job-load"))
        client.close()
    quarter = [rss for _, done, rss in samples if done >= N // 4]
    growth = (max(quarter) - quarter[0]) / quarter[0]
    rss_mib = [round(rss / 2**20, 1) for _, _, rss in samples[:: max(1, len(samples) // 12)]]
    happened = (
        f"{N / seconds:.0f} img/s; worker RSS {quarter[0] / 2**20:.0f} -> {max(quarter) / 2**20:.0f} MiB "
        f"from 25% to the end ({growth:+.1%}); Redis {per_item:.0f} B per pending item"
    )
    figures = tally(f"one job of {N:,} items through one worker", refs, rows, info, happened=happened, rss_mib=rss_mib)
    print(
        f"\nload: {N} items in {seconds:.0f}s ({N / seconds:.0f} img/s); enqueue {enqueue_rate:.0f} items/s; "
        f"Redis {per_item:.0f} B per pending item; worker RSS {quarter[0] / 2**20:.0f} -> {max(quarter) / 2**20:.0f}"
        f" MiB after 25% ({growth:+.1%})"
    )
    for t, done, rss in samples[:: max(1, len(samples) // 12)]:
        print(f"  t={t:6.0f}s done={done:7d} rss={rss / 2**20:7.1f} MiB")
    assert (figures["lost"], figures["counters_off"], figures["ok"]) == (0, 0, N)
    assert info.state.value == "done"
    assert growth < 0.10, "worker memory grows with the job"
    assert per_item <= 300
