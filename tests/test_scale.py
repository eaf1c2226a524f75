"""Archives larger than memory: the producer waits for workers when the queue is full, and the ledger keeps
references relative to the folder enqueued."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import redis

from producer.jobs import _DEPTH_CHECK_EVERY, JobClient
from tests.conftest import settings_from
from tests.test_recovery import wait_for


def test_enqueue_waits_while_the_queue_is_full_and_goes_on_as_it_drains(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    """On a redis-server of the test's own, whose LLEN count is the producer's looks at the queue."""
    from producer.local import LocalRedis

    queue = f"captions-full-{uuid.uuid4().hex[:6]}"
    urls = tmp_path / "urls.txt"
    n = 3 * _DEPTH_CHECK_EVERY + 50
    urls.write_text("".join(f"https://images.example.org/a/{i:06d}.jpg\n" for i in range(n)))
    stderr = tmp_path / "stderr.txt"
    argv = [sys.executable, "-m", "cli.main", "enqueue", str(urls), "--chunk-size", "1", "--job-id", "full"]
    with LocalRedis() as server, stderr.open("wb") as err:
        own = {
            **worker_env,
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_RESULT_BACKEND": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(1),
            "CAPTIONER_CAPTION_QUEUE": queue,
            "CAPTIONER_MAX_QUEUED_CHUNKS": "20",
        }
        broker = redis.Redis.from_url(server.url(0))
        proc = subprocess.Popen(argv, env={**os.environ, **own}, stdout=subprocess.PIPE, stderr=err)

        def waiting() -> bool:
            assert proc.poll() is None, stderr.read_text()
            return b"waiting" in stderr.read_bytes()

        def looks() -> int:
            return broker.info("commandstats").get("cmdstat_llen", {}).get("calls", 0)

        wait_for(waiting, 120, "the producer to wait for the queue")
        # It stopped at its first look at the queue, a hundred messages in, and stays stopped while it looks again.
        seen = looks()

        def stays_stopped() -> bool:  # LINDEX, not LLEN: the test's own reads leave the producer's count alone
            assert proc.poll() is None and broker.lindex(queue, _DEPTH_CHECK_EVERY) is None, "it went on"
            return looks() >= seen + 3

        wait_for(stays_stopped, 120, "the producer to look at the full queue three more times")
        assert broker.llen(queue) == _DEPTH_CHECK_EVERY and proc.poll() is None
        depths, taken = [], 0

        def drained() -> bool:  # a worker's part: take what is queued; done once the producer has ended
            nonlocal taken
            while depth := broker.llen(queue):
                depths.append(depth)
                taken += broker.rpop(queue) is not None
            return proc.poll() is not None and not broker.llen(queue)

        wait_for(drained, 300, "the producer to go on as the queue drains")
        assert proc.wait(10) == 0, stderr.read_text()
        info = JobClient(settings_from(own)).status("full")
    assert taken == n
    assert max(depths) <= 20 + _DEPTH_CHECK_EVERY  # it never ran more than one check's worth past the limit
    assert info.total == n and info.state.value == "running"


def test_references_under_the_folder_enqueued_are_stored_relative_to_it(
    worker_env: dict[str, str], session_root: Path, settings
) -> None:
    from click.testing import CliRunner

    from cli.main import cli

    folder = session_root / f"deep-{uuid.uuid4().hex[:6]}"
    for sub in ("2024/01", "2024/02"):
        (folder / sub).mkdir(parents=True)
        for i in range(3):
            (folder / sub / f"img-{i}.jpg").write_bytes(b"not decoded by the producer")
    queue = f"captions-rel-{uuid.uuid4().hex[:6]}"
    env = {**worker_env, "CAPTIONER_CAPTION_QUEUE": queue}
    out = CliRunner().invoke(cli, ["enqueue", str(folder), "--job-id", "rel"], env=env)
    assert out.exit_code == 0, out.output
    client = JobClient(settings_from(env))
    pending = dict(client.ledger.iter_pending("rel"))
    assert sorted(pending.values()) == sorted(str(p) for p in folder.rglob("*.jpg"))
    # Stored without the folder's path: every manifest entry is shorter than its reference.
    raw = redis.Redis.from_url(settings.redis_url_str).hvals(f"{settings.key_prefix}:job:rel:src")
    assert raw and all(not v.startswith(str(folder).encode()) and len(v) < len(str(folder)) for v in raw)
    client.close()


def test_duplicate_images_in_flight_are_captioned_once(settings, session_root: Path, tiny_model: Path) -> None:
    """With reuse on, items whose bytes another item in hand is being captioned for wait for that caption: one
    model run per distinct image, however many copies arrive together, and the copies' rows say reused."""
    import shutil

    from common.messages import GenParams, Source
    from ledger import ledger_from_settings
    from model.engine import CaptionEngine, EngineConfig
    from tests.conftest import shape_files
    from worker.service import CaptionService

    originals = shape_files(session_root, "twins", 3, seed=31)
    copies = []
    for i, src in enumerate(originals):
        for k in range(2):
            copies.append(str(Path(src).with_name(f"copy-{i}-{k}.png")))
            shutil.copyfile(src, copies[-1])
    items = [(f"{i:016x}", Source(path=p)) for i, p in enumerate(originals + copies)]
    engine = EngineConfig(model=str(tiny_model), device="cpu", dtype="float32")
    service = CaptionService(
        settings.model_copy(update={"reuse_captions": True}),
        reuse=ledger_from_settings(settings),
        engine_factory=lambda: CaptionEngine.load(engine),
    )
    try:
        rows = service.caption_items(items, GenParams(max_length=12))
        ran = service.batcher.stats.items
    finally:
        service.close()
    by_ref = {r.ref: r for r in rows}
    assert all(r.status.value == "ok" for r in rows) and ran == len(originals)
    for i, src in enumerate(originals):
        twins = [by_ref[src], by_ref[copies[2 * i]], by_ref[copies[2 * i + 1]]]
        assert len({r.caption for r in twins}) == 1 and sum(bool(r.reused) for r in twins) == 2


def test_enqueueing_subscribes_to_no_result_channel(worker_env: dict[str, str]) -> None:
    """Chunks, notices and fine-tunes are recorded in the ledger: a producer sending thousands of them must not
    subscribe to each one's Celery result channel (a SUBSCRIBE per message, an UNSUBSCRIBE as each unused result is
    collected). Counted by the producer's own redis-server, which sees no other client."""
    from common.messages import TrainRequest
    from producer.local import LocalRedis

    with LocalRedis() as server:
        env = {
            **worker_env,
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_RESULT_BACKEND": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(1),
        }
        client = JobClient(settings_from(env))
        refs = [f"https://images.example.org/s/{i:05d}.jpg" for i in range(300)]
        report = client.enqueue(refs, job_id="quiet", chunk_size=10)
        client.submit_training(TrainRequest(job_id="quiet-train", dataset="/data/set", config={"max_steps": 1}))
        client.close()
        stats = redis.Redis.from_url(server.url(0)).info("commandstats")
    assert report.messages == 30
    assert stats["cmdstat_lpush"]["calls"] >= 31  # the messages went out through this server
    assert "cmdstat_subscribe" not in stats and "cmdstat_unsubscribe" not in stats
