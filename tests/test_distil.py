"""Teacher -> student: `captioner train --from-job JOB` fine-tunes a fresh small GIT on a finished caption job's
captions, through real caption and training workers; the student then agrees with the teacher far more on images
neither was trained on."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from common.messages import CaptionTask, GenParams, ItemResult, ItemStatus, item_id
from common.settings import Settings
from common.store import ModelStore
from ledger import Ledger
from producer.jobs import JobClient
from producer.local import LocalRedis, WorkerProcess
from tests.conftest import settings_from

IMAGE_SIZE = 48
#: The demo's recipe for a GIT trained from scratch (cli/demo.py), as `captioner train` options.
RECIPE = (
    "--learning-rate",
    "3e-3",
    "--batch-size",
    "32",
    "--set",
    "lr_scheduler=linear",
    "--set",
    "grad_accum=1",
    "--set",
    "epochs=1000",
    "--set",
    "max_length=20",
    "--set",
    "eval_max_samples=20",
    "--set",
    "log_steps=50",
)


def _small_git(out: Path, seed: int) -> Path:
    """The demo's small GIT (48-pixel images, 30-word tokenizer), randomly initialised with ``seed``."""
    from training.synthetic import vocabulary
    from training.tiny import build_word_git

    return build_word_git(
        out, vocabulary(), seed=seed, image_size=IMAGE_SIZE, patch_size=16, hidden_size=32, init_range=0.1, dropout=0.0
    )


def _run(env: dict[str, str], *args: str) -> dict:
    """The CLI against the stack's Redis, its --json output parsed."""
    result = CliRunner().invoke(cli, [*args, "--json"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.stderr + result.stdout
    return json.loads(result.stdout.strip().splitlines()[-1])


def _captions(env: dict[str, str], job: str) -> dict[str, str]:
    client = JobClient(settings_from(env))
    try:
        return {r["ref"]: r["caption"] for r in client.results(job) if r["status"] == "ok"}
    finally:
        client.close()


@pytest.mark.timeout(900)
def test_a_student_trained_on_a_teachers_job_agrees_with_the_teacher(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    from training.data import Example
    from training.evaluation import evaluate_model
    from training.scores import caption_metrics
    from training.synthetic import make_shapes

    root = session_root / f"distil-{uuid.uuid4().hex[:6]}"
    make_shapes(root / "labelled", 400, seed=11, size=IMAGE_SIZE)  # the teacher's own training set
    sample = [str(p) for p, _ in make_shapes(root / "sample", 400, seed=12, size=IMAGE_SIZE)]  # what it captions
    held_out = [str(p) for p, _ in make_shapes(root / "held-out", 40, seed=13, size=IMAGE_SIZE)]
    teacher_base, student_base = _small_git(tmp_path / "teacher-base", 0), _small_git(tmp_path / "student-base", 1)
    with LocalRedis() as server:
        store = ModelStore(tmp_path / "models")
        env = {
            **worker_env,
            "CAPTIONER_BROKER_URL": server.url(0),
            "CAPTIONER_RESULT_BACKEND": server.url(0),
            "CAPTIONER_REDIS_URL": server.url(1),
            "CAPTIONER_MODEL_STORE": str(store.root),
            "CAPTIONER_MAX_LENGTH": "20",
            "CAPTIONER_TORCH_THREADS": "1",
        }
        with WorkerProcess(env, training=True, log=tmp_path / "train.log") as trainer:
            trainer.wait_ready()
            # 1. A teacher: the small GIT trained on labelled shapes (a big captioner's stand-in).
            teacher = _run(
                env,
                "train",
                str(root / "labelled"),
                "--base-model",
                str(teacher_base),
                "--max-steps",
                "300",
                *RECIPE,
                "--wait",
            )["result"]["version"]
            # 2. The teacher captions the sample (and the held-out images, the references of agreement).
            with WorkerProcess({**env, "CAPTIONER_MODEL": f"@{teacher}"}, log=tmp_path / "teacher.log") as worker:
                worker.wait_ready()
                job = _run(env, "enqueue", str(root / "sample"), "--job-id", "teacher-sample", "--wait")["job"]
                assert (job["state"], job["ok"]) == ("done", len(sample))
                _run(env, "enqueue", str(root / "held-out"), "--job-id", "teacher-held-out", "--wait")
            taught = _captions(env, "teacher-held-out")
            assert len(taught) == len(held_out)
            # 3. A fresh student learns the teacher's captions of the sample.
            result = _run(
                env,
                "train",
                "--from-job",
                "teacher-sample",
                "--base-model",
                str(student_base),
                "--max-steps",
                "300",
                *RECIPE,
                "--wait",
            )["result"]
            student = result["version"]
        assert store.get(student).meta["dataset"] == "job:teacher-sample"
        # 4. The student captions the held-out images through a worker: the archive, captioned by the small model.
        with WorkerProcess({**env, "CAPTIONER_MODEL": f"@{student}"}, log=tmp_path / "student.log") as worker:
            worker.wait_ready()
            _run(env, "enqueue", str(root / "held-out"), "--job-id", "student-held-out", "--wait")
        learned = _captions(env, "student-held-out")
    refs = sorted(taught)
    examples = [Example(image=p, captions=[taught[p]]) for p in refs]
    before = evaluate_model(student_base, examples, max_length=20)["wer"]
    after = caption_metrics([learned[p] for p in refs], [[taught[p]] for p in refs])["wer"]
    print(f"student WER against the teacher's captions on {len(refs)} held-out images: {before:.3f} -> {after:.3f}")
    # Measured: 1.575 -> 0.068, 1.573 -> 0.122, 1.562 -> 0.052 (training here is not bit-exact from run to run).
    # A student trained on the same captions paired with the wrong images (each image with its neighbour's caption)
    # learns the captions' language and still reaches 0.307: agreeing with the teacher image by image is more.
    assert after < 0.2 and after < 0.15 * before, (before, after)


def test_job_examples_take_the_chosen_tasks_caption_or_the_reviewed_rows(ledger: Ledger, tmp_path: Path) -> None:
    from common.errors import ConfigError, SourceError
    from training.data import job_examples

    tasks = (CaptionTask(name="short"), CaptionTask(name="detailed", prompt="a picture of"))
    params = GenParams(max_length=20, tasks=tasks)
    refs = [str(tmp_path / f"{i}.jpg") for i in range(4)] + ["https://example.org/x.jpg", "b64:0123"]
    ledger.open_job("teach", "test", params)
    ledger.add_items("teach", [(item_id(r), r) for r in refs])
    rows = [
        ItemResult(
            id=item_id(r),
            ref=r,
            status=ItemStatus.OK,
            caption=f"short {i}",
            params=params,
            captions={"short": f"short {i}", "detailed": f"a picture of {i}"},
        )
        for i, r in enumerate(refs)
    ]
    rows[3] = ItemResult(
        id=item_id(refs[3]), ref=refs[3], status=ItemStatus.ERROR, error_class="decode_error", error="x", params=params
    )
    ledger.record("teach", rows)
    ledger.set_correction("teach", item_id(refs[0]), "a corrected caption", "ann")
    ledger.set_mark("teach", [item_id(refs[1])], "rejected", "ann")
    ledger.set_mark("teach", [item_id(refs[2])], "accepted", "ann")

    def pairs(**kw: object) -> dict[str, str]:
        return {ex.image: ex.captions[0] for ex in job_examples(ledger, "teach", **kw)}  # type: ignore[arg-type]

    # Ok rows with a readable image (a path or a URL; inline bytes cannot be read again); a rejected row is left out.
    assert pairs() == {refs[0]: "a corrected caption", refs[2]: "short 2", refs[4]: "short 4"}
    assert pairs(task="detailed") == {refs[0]: "a picture of 0", refs[2]: "a picture of 2", refs[4]: "a picture of 4"}
    assert pairs(reviewed_only=True) == {refs[0]: "a corrected caption", refs[2]: "short 2"}
    with pytest.raises(ConfigError, match="no task 'tags'"):
        job_examples(ledger, "teach", task="tags")
    ledger.open_job("empty", "test", GenParams())
    with pytest.raises(SourceError, match="no captioned row"):
        job_examples(ledger, "empty")


def test_train_from_job_is_checked_before_anything_is_sent(
    settings: Settings, client: JobClient, tmp_path: Path
) -> None:
    from common.messages import JobKind
    from tests.test_cli import invoke

    tasks = (CaptionTask(name="short"), CaptionTask(name="detailed", prompt="a picture of"))
    client.ledger.open_job("cap", "test", GenParams(tasks=tasks))
    client.ledger.add_items("cap", [(item_id("/x.jpg"), "/x.jpg")])
    client.ledger.seal("cap")
    client.ledger.open_job("fit", "test", None, kind=JobKind.TRAIN)
    cases = [
        (("train",), 2, "give DATASET or --from-job"),
        (("train", str(tmp_path), "--from-job", "cap"), 2, "one of them"),
        (("train", str(tmp_path), "--task", "short"), 2, "--from-job"),
        (("train", "--from-job", "nope"), 1, "no job 'nope'"),
        (("train", "--from-job", "fit"), 1, "is a train job"),
        (("train", "--from-job", "cap"), 1, "still running"),
    ]
    for args, exit_code, words in cases:
        code, _, err = invoke(settings, *args)
        assert (code, words in err, "Traceback" in err) == (exit_code, True, False), (args, err)
    client.ledger.record(
        "cap",
        [
            ItemResult(
                id=item_id("/x.jpg"),
                ref="/x.jpg",
                status=ItemStatus.OK,
                caption="a",
                captions={"short": "a", "detailed": "b"},
                params=GenParams(tasks=tasks),
            )
        ],
    )
    code, _, err = invoke(settings, "train", "--from-job", "cap", "--task", "tags")
    assert code == 1 and "no task 'tags' (its tasks: short, detailed)" in err, err
