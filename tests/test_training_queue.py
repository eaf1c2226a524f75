"""Training and model versions through the queue with real workers: hot swap under load, a killed training
worker resuming from its checkpoint, a stopped one handing its job on, a job longer than the visibility timeout
running once, cancel."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis

from common.messages import TASK_TRAIN, GenParams, JobState, TrainRequest
from common.store import ModelStore
from producer.jobs import JobClient
from producer.local import LocalRedis, WorkerProcess
from tests.conftest import note_fault, settings_from, shape_files, snapshot, tally
from tests.test_recovery import wait_for

FAST = {"learning_rate": 3e-3, "lr_scheduler": "constant", "batch_size": 8, "grad_accum": 1, "epochs": 1000,
        "max_length": 12, "eval_max_samples": 8, "log_steps": 5}  # fmt: skip


@pytest.fixture
def stack(worker_env: dict[str, str], session_root: Path, tmp_path: Path):
    """A redis-server of its own, a model store with the tiny GIT promoted, and the env for workers."""
    with LocalRedis() as server:
        store = ModelStore(tmp_path / "models")
        env = {**worker_env, "CAPTIONER_BROKER_URL": server.url(0), "CAPTIONER_RESULT_BACKEND": server.url(0),
               "CAPTIONER_REDIS_URL": server.url(1), "CAPTIONER_MODEL": "@current",
               "CAPTIONER_MODEL_STORE": str(store.root), "CAPTIONER_MODEL_POLL_S": "0.5",
               "CAPTIONER_VISIBILITY_TIMEOUT_S": "5", "CAPTIONER_UNACKED_RESTORE_INTERVAL_S": "1",
               "CAPTIONER_TRAIN_LOCK_TTL_S": "4", "CAPTIONER_TORCH_THREADS": "1"}  # fmt: skip
        yield env, store


def _tiny(store: ModelStore, tmp_path: Path, seed: int, name: str) -> str:
    from training.tiny import build_tiny_git

    return store.add(build_tiny_git(tmp_path / f"m{seed}", seed=seed), {"base_model": "tiny"}, name).version


def test_hot_swap_under_load_loses_nothing_and_rows_switch_version(stack, session_root: Path, tmp_path: Path) -> None:
    env, store = stack
    store.promote(_tiny(store, tmp_path, 0, "v-old"))
    new = _tiny(store, tmp_path, 1, "v-new")
    refs = shape_files(session_root, "swap", 200, seed=4)
    with WorkerProcess({**env, "CAPTIONER_MAX_BATCH_SIZE": "4"}, log=tmp_path / "w.log") as proc:
        proc.wait_ready()
        client = JobClient(settings_from(env))
        client.enqueue(refs, job_id="job-swap", chunk_size=4, params=GenParams(max_length=12))
        wait_for(lambda: client.status("job-swap").ok >= 40, 120, "captions from the old version")
        before = snapshot(client, "job-swap")  # taken before the promotion: all of these are v-old's
        store.promote(new)
        promoted_at = time.time()
        at_promote = client.status("job-swap").ok
        assert 0 < at_promote < len(refs), f"the promotion landed at ok={at_promote} of {len(refs)}, not mid-job"
        info = client.wait("job-swap", timeout=240, on_tick=lambda _: None)
        rows = list(client.results("job-swap"))
        client.close()
    by_version = {v: sum(r["model_version"] == v for r in rows) for v in ("v-old", "v-new")}
    figures = tally("model promoted while a job runs (hot swap)", refs, rows, info, before=before,
                    happened=f"the worker loaded the new version beside the old and switched between batches: "
                    f"{by_version['v-old']} rows from v-old, then {by_version['v-new']} from v-new")  # fmt: skip
    assert (figures["lost"], figures["counters_off"], figures["replaced"]) == (0, 0, 0)
    assert (info.state.value, info.ok, info.error) == ("done", len(refs), 0)
    assert {r["model_version"] for r in before.values()} == {"v-old"}
    versions = [r["model_version"] for r in sorted(rows, key=lambda r: r["finished_at"])]
    assert set(versions) == {"v-old", "v-new"}
    assert versions[:20] == ["v-old"] * 20 and versions[-20:] == ["v-new"] * 20
    swapped_at = [r["finished_at"] for r in rows if r["model_version"] == "v-new"]
    assert min(swapped_at) > promoted_at  # nothing was captioned by the new version before its promotion


def _train_request(
    store: ModelStore, root: Path, tmp_path: Path, job_id: str, *, images: int, seed: int, steps: int, every: int
) -> TrainRequest:
    """A tiny base model in the store, a shapes dataset, and a fine-tune request on them."""
    from training.synthetic import make_shapes

    base = store.get(_tiny(store, tmp_path, 0, "base"))
    data = root / f"train-{uuid.uuid4().hex[:6]}"
    make_shapes(data, images, seed=seed, size=32)
    config = {**FAST, "base_model": str(base.path), "max_steps": steps, "eval_steps": every, "save_steps": every}
    return TrainRequest(job_id=job_id, dataset=str(data), config=config)


def _submit_to_a_new_worker(env: dict[str, str], req: TrainRequest, tmp_path: Path) -> tuple[JobClient, WorkerProcess]:
    """A training worker started and ready (log t1.log), then the job submitted to it."""
    client = JobClient(settings_from(env))
    first = WorkerProcess(env, training=True, log=tmp_path / "t1.log").start()
    first.wait_ready()
    client.submit_training(req)
    return client, first


def test_killed_training_worker_resumes_from_its_checkpoint_and_finishes_once(
    stack, session_root: Path, tmp_path: Path
) -> None:

    env, store = stack
    req = _train_request(store, session_root, tmp_path, "train-kill", images=48, seed=3, steps=240, every=40)
    client, first = _submit_to_a_new_worker(env, req, tmp_path)
    run_dir = store.root / ".runs" / req.job_id / "checkpoints"

    def saved_steps() -> list[int]:  # finished checkpoints only (a .tmp folder is one being written)
        names = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
        return [int(n.removeprefix("step-")) for n in names if n.startswith("step-") and n[5:].isdigit()]

    wait_for(lambda: bool(saved_steps()), 240, "a checkpoint")
    assert first.kill() == -9
    saved = max(saved_steps())
    assert saved < 240, "the kill must land mid-run"
    seen_after: list[int] = []
    with WorkerProcess(env, training=True, log=tmp_path / "t2.log") as second:
        second.wait_ready()

        def progress_done() -> bool:
            info = client.status(req.job_id)
            step = (info.extra.get("progress") or {}).get("step")
            if step is not None:
                seen_after.append(step)
            return info.state.value == "done"

        wait_for(progress_done, 300, "the resumed run to finish")
    info = client.status(req.job_id)
    client.close()
    assert info.extra["result"]["steps"] == 240
    assert "resuming training job train-kill" in second.log_path.read_text()
    resumed = [s for s in seen_after if s != seen_after[0]] or seen_after
    assert min(resumed) > saved - 1, f"resumed at {min(resumed)}, before the checkpoint at {saved}"
    versions = [v for v in store.list() if v.meta.get("job_id") == req.job_id]
    note_fault("training worker killed with SIGKILL mid-run, then a new one",
               f"the new worker resumed from the step-{saved} checkpoint and ran to step 240; one model version",
               n=1, ok=int(len(versions) == 1), lost=0, duplicated=len(versions) - 1)  # fmt: skip
    assert len(versions) == 1, "the job must produce exactly one version"
    assert not list(store.root.rglob("*.bin")) and not list(store.root.rglob("*.pt"))


def test_a_stopped_training_worker_hands_its_job_on_from_the_step_it_reached(
    stack, session_root: Path, tmp_path: Path
) -> None:
    """SIGTERM (an upgrade, a scale-down): the run checkpoints at its next step and the next worker resumes there,
    not from the last scheduled checkpoint, and the stop does not wait for the run to end."""
    env, store = stack
    req = _train_request(store, session_root, tmp_path, "train-stop", images=32, seed=7, steps=300, every=300)
    client, first = _submit_to_a_new_worker(env, req, tmp_path)
    wait_for(lambda: (client.status(req.job_id).extra.get("progress") or {}).get("step", 0) >= 10, 120,
             "training to start")  # fmt: skip
    asked = time.monotonic()
    assert first.terminate(timeout=60) == 0
    stop_s = time.monotonic() - asked
    checkpoints = store.root / ".runs" / req.job_id / "checkpoints"
    saved = max(int(p.name.removeprefix("step-")) for p in checkpoints.glob("step-*") if p.name[5:].isdigit())
    assert 10 <= saved < 300, "the stop must land mid-run, after step 10"
    assert f"training job train-stop interrupted at step {saved}" in first.log_path.read_text()
    assert client.status(req.job_id).state is JobState.RUNNING and not client.ledger.locked(req.job_id)
    with WorkerProcess(env, training=True, log=tmp_path / "t2.log") as second:
        second.wait_ready()
        info = client.wait(req.job_id, timeout=300, on_tick=lambda _: None)
    client.close()
    log2 = second.log_path.read_text()
    assert info.state is JobState.DONE and info.extra["result"]["steps"] == 300
    assert f"step-{saved} at step {saved}" in log2  # resumed where the stop left it
    versions = [v for v in store.list() if v.meta.get("job_id") == req.job_id]
    note_fault("training worker stopped with SIGTERM mid-run, then a new one",
               f"the run checkpointed at step {saved} and the worker exited in {stop_s:.1f} s; the new worker "
               "resumed at that step and ran to step 300; one model version",
               n=1, ok=int(len(versions) == 1), lost=0, duplicated=len(versions) - 1)  # fmt: skip
    assert len(versions) == 1
    assert stop_s < 30, f"the stop took {stop_s:.0f} s: it waited for the run instead of handing it on"


def test_training_longer_than_the_visibility_timeout_runs_once(stack, session_root: Path, tmp_path: Path) -> None:

    env, store = stack
    req = _train_request(store, session_root, tmp_path, "train-long", images=32, seed=5, steps=400, every=100)
    client = JobClient(settings_from(env))
    with WorkerProcess(env, training=True, log=tmp_path / "t.log") as proc:
        proc.wait_ready()
        started = time.monotonic()
        client.submit_training(req)
        info = client.wait(req.job_id, timeout=300, on_tick=lambda _: None)
        took = time.monotonic() - started
    client.close()
    log = proc.log_path.read_text()
    assert took > 2 * 5, "the run must outlast the 5 s visibility timeout, twice over"
    runs = log.count(" received")
    note_fault("a fine-tune longer than the visibility timeout", f"{took:.0f} s against a 5 s timeout: delivered and "
               f"run {runs} time(s) (early ack, heartbeat lock)", n=1, ok=int(info.state.value == "done"), lost=0,
               duplicated=runs - 1)  # fmt: skip
    assert info.state.value == "done"
    assert log.count(f"Task {TASK_TRAIN}[") - log.count("succeeded") <= 1  # one 'received' line for one run
    assert log.count(" received") == 1
    assert "already running elsewhere" not in log


def test_cancel_stops_training_cleanly_at_a_checkpoint(stack, session_root: Path, tmp_path: Path) -> None:

    env, store = stack
    req = _train_request(store, session_root, tmp_path, "train-cancel", images=32, seed=6, steps=5000, every=1000)
    client = JobClient(settings_from(env))
    with WorkerProcess(env, training=True, log=tmp_path / "t.log") as proc:
        proc.wait_ready()
        client.submit_training(req)
        wait_for(lambda: (client.status(req.job_id).extra.get("progress") or {}).get("step", 0) >= 10, 120,
                 "training to start")  # fmt: skip
        client.cancel(req.job_id)
        wait_for(lambda: f"Task {TASK_TRAIN}" in proc.log_tail(50) and "succeeded" in proc.log_tail(50), 120,
                 "the training task to return")  # fmt: skip
    client.close()
    checkpoints = list((store.root / ".runs" / req.job_id / "checkpoints").glob("step-*"))
    assert checkpoints, "a cancelled run leaves a checkpoint to resume from"
    assert "'status': 'cancelled'" in proc.log_path.read_text()
    assert not [v for v in store.list() if v.meta.get("job_id") == req.job_id]
    assert redis.Redis.from_url(env["CAPTIONER_REDIS_URL"]).exists(f"{settings_from(env).key_prefix}:job:train-cancel")
