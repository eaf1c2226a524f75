"""Each fact in one place: a job's generation defaults are the settings' wherever a job starts (the CLI, the job
client, a worker taking a message that leaves them out), and a training request is checked once in a process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from common.messages import ChunkMessage, GenParams, parse_message
from common.settings import Settings, get_settings
from producer.jobs import JobClient
from tests.conftest import shape_files


@pytest.fixture
def deployment(settings: Settings) -> Iterator[Settings]:
    """The test settings with other generation defaults, on a queue no worker takes from."""
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    yield settings.model_copy(update={"max_length": 37, "num_beams": 2, "caption_queue": queue})
    redis.Redis.from_url(settings.broker_url_str).delete(queue)


def test_generation_defaults_are_the_settings_wherever_a_job_starts(
    deployment: Settings, session_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.base import gen_params

    assert gen_params(deployment, None, None, "a photo of") == GenParams(
        max_length=37, num_beams=2, prompt="a photo of"
    )
    assert gen_params(deployment, 20, None, None) == GenParams(max_length=20, num_beams=2)

    client = JobClient(deployment)
    try:
        client.enqueue(shape_files(session_root, "defaults", 2, seed=1), job_id="defaults-job")
        assert client.status("defaults-job").params == GenParams(max_length=37, num_beams=2)
    finally:
        client.close()

    from worker.tasks import _payload

    monkeypatch.setenv("CAPTIONER_MAX_LENGTH", "37")
    monkeypatch.setenv("CAPTIONER_NUM_BEAMS", "2")
    get_settings.cache_clear()
    try:
        for params, made in (
            (None, GenParams(max_length=37, num_beams=2)),
            ({"num_beams": 3}, GenParams(max_length=37, num_beams=3)),
        ):
            msg = parse_message(ChunkMessage, _payload(job_id="j", items=["/a.jpg"], params=params))
            assert isinstance(msg, ChunkMessage) and msg.params == made
    finally:
        get_settings.cache_clear()


def test_a_training_request_is_checked_once_in_the_process_that_sends_it(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.requests
    from cli.main import cli
    from training.synthetic import make_shapes

    checked: list[str] = []
    check = training.requests.check_train_request

    def counted(req: Any) -> None:
        checked.append(req.job_id)
        check(req)

    monkeypatch.setattr(training.requests, "check_train_request", counted)
    data = session_root / f"once-{uuid.uuid4().hex[:6]}"
    make_shapes(data, 2, seed=1, size=32)
    queue = f"nobody-{uuid.uuid4().hex[:6]}"
    env = {**worker_env, "CAPTIONER_TRAINING_QUEUE": queue, "CAPTIONER_MODEL_STORE": str(tmp_path / "store")}
    broker = redis.Redis.from_url(worker_env["CAPTIONER_BROKER_URL"])
    try:
        out = CliRunner().invoke(cli, ["train", str(data), "--max-steps", "1", "--job-id", "train-once"], env=env)
        assert out.exit_code == 0, out.output
        assert checked == ["train-once"]
        # ... and still before anything is sent: a bad config is one line, nothing queued.
        out = CliRunner().invoke(cli, ["train", str(data), "--set", "no_such=1", "--job-id", "train-bad"], env=env)
        assert out.exit_code == 1 and "no such training option" in out.stderr, out.output
        assert broker.llen(queue) == 1  # the first request only
    finally:
        broker.delete(queue)
