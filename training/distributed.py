"""A fine-tune over several processes: the training task launches ``torchrun`` as a supervised child and keeps the
lock, heartbeat, progress, cancel and SIGTERM hand-over in its own process.

Parent and children talk through files in the run directory, so nothing but the run directory is shared::

    launch.json      the run: config, examples, image policy (written by the parent)
    control.json     {"stop": bool, "lost": bool}: a cancel or shutdown, or a lost lock (parent -> children)
    progress.jsonl   one progress record a line (the first process -> parent, appended)
    result.json      the TrainResult (the first process, at the end); error-<rank>.txt: why a process failed
    launch.log       the children's output

Each child runs ``training.finetune.train`` under accelerate, which joins the process group torchrun set up (NCCL
on GPUs, gloo on CPUs). Checkpoints are the same as a single process's, so a run resumes with any process count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.errors import CaptionerError, ConfigError
from media.images import ImagePolicy
from training.config import TrainConfig
from training.data import Example
from training.finetune import TrainResult, train

log = logging.getLogger(__name__)

LAUNCH_FILE = "launch.json"
CONTROL_FILE = "control.json"
PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"
LOG_FILE = "launch.log"
#: How often the parent forwards progress and passes a stop on (seconds).
POLL_S = 0.2


def devices() -> tuple[int, str]:
    """How many processes this machine can run a fine-tune on: its GPUs, or its CPU cores where it has none."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPU"
    return os.cpu_count() or 1, "CPU core"


def check_processes(n: int) -> None:
    have, kind = devices()
    if n > have:
        raise ConfigError(
            f"{n} training processes asked for, but this training worker has {have} {kind}(s); "
            f"use at most {have} (num_processes / CAPTIONER_TRAIN_PROCESSES)"
        )


def run(
    cfg: TrainConfig,
    train_set: list[Example],
    eval_set: list[Example],
    out_dir: Path,
    *,
    processes: int,
    on_progress: Callable[[dict[str, Any]], None],
    should_stop: Callable[[], bool],
    lost: Callable[[], bool],
    image_policy: ImagePolicy,
    torch_threads: int = 0,
) -> TrainResult:
    """``train`` in this process (one process), or in ``processes`` children supervised from here."""
    if processes == 1:
        return train(
            cfg,
            train_set,
            eval_set,
            out_dir,
            on_progress=on_progress,
            should_stop=should_stop,
            lost=lost,
            image_policy=image_policy,
        )
    # 1. The run on disk, and no word from an earlier launch left over.
    check_processes(processes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (CONTROL_FILE, RESULT_FILE, *(p.name for p in out_dir.glob("error-*.txt"))):
        (out_dir / stale).unlink(missing_ok=True)
    # Progress is appended over every launch of the run (its whole curve, resumes included); this one's follows.
    start = (out_dir / PROGRESS_FILE).stat().st_size if (out_dir / PROGRESS_FILE).is_file() else 0
    spec = {
        "config": asdict(cfg),
        "out_dir": str(out_dir),
        "torch_threads": torch_threads,
        "train": [[ex.image, ex.captions] for ex in train_set],
        "eval": [[ex.image, ex.captions] for ex in eval_set],
        "policy": _policy_json(image_policy),
    }
    (out_dir / LAUNCH_FILE).write_text(json.dumps(spec), encoding="utf-8")
    _control(out_dir, stop=False, lost=False)

    # 2. torchrun and its children; they end with this process (a killed worker leaves no trainer behind).
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "training.distributed",
        str(out_dir / LAUNCH_FILE),
    ]
    log.info("launching %d training processes: %s", processes, " ".join(argv[1:]))
    with open(out_dir / LOG_FILE, "ab") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        try:
            # 3. Supervise: progress up, a stop or a lost lock down, until the children are done.
            _supervise(child, out_dir, start, on_progress, should_stop, lost)
        finally:
            if child.poll() is None:  # this thread is being torn down: take the children with it
                child.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(60)
    # 4. The first process's result, or the first error any process wrote down.
    if (out_dir / RESULT_FILE).is_file() and child.returncode == 0:
        return TrainResult.from_json(json.loads((out_dir / RESULT_FILE).read_text(encoding="utf-8")))
    errors = sorted(out_dir.glob("error-*.txt"))
    if errors:
        raise CaptionerError(errors[0].read_text(encoding="utf-8").strip())
    raise CaptionerError(
        f"the distributed training run exited with code {child.returncode} and no result; its "
        f"output is in {out_dir / LOG_FILE}"
    )


def _supervise(
    child: subprocess.Popen[bytes],
    out_dir: Path,
    offset: int,
    on_progress: Callable[[dict[str, Any]], None],
    should_stop: Callable[[], bool],
    lost: Callable[[], bool],
) -> None:
    told = (False, False)
    while True:
        done = child.poll() is not None
        offset = _forward(out_dir / PROGRESS_FILE, offset, on_progress)
        if done:
            return
        flags = (should_stop(), lost())
        if flags != told and any(flags):
            _control(out_dir, stop=flags[0], lost=flags[1])
            told = flags
        time.sleep(POLL_S)


def _forward(path: Path, offset: int, on_progress: Callable[[dict[str, Any]], None]) -> int:
    """Progress records appended since ``offset``, passed on; returns the new offset (whole lines only)."""
    if not path.is_file():
        return offset
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        if line.strip():
            on_progress(json.loads(line))
    return offset + end


def _control(out_dir: Path, *, stop: bool, lost: bool) -> None:
    tmp = out_dir / f".{CONTROL_FILE}.tmp"
    tmp.write_text(json.dumps({"stop": stop, "lost": lost}), encoding="utf-8")
    os.replace(tmp, out_dir / CONTROL_FILE)


def _die_with_parent() -> None:
    """SIGTERM to this process when its parent dies (Linux): torchrun when the training worker dies, and each
    training process when torchrun does."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _policy_json(policy: ImagePolicy) -> dict[str, Any]:
    data = asdict(policy)
    data["allowed_roots"] = [str(p) for p in policy.allowed_roots]
    data["allowed_networks"] = [str(n) for n in policy.allowed_networks]
    data["objects"] = None if policy.objects is None else policy.objects.as_dict()
    return data


# --- in each child ---------------------------------------------------------------------------------------


class _Control:
    """The parent's word, read from control.json (at most every POLL_S)."""

    def __init__(self, path: Path) -> None:
        self.path, self._read_at, self._flags = path, 0.0, {"stop": False, "lost": False}

    def _get(self, name: str) -> bool:
        if time.monotonic() - self._read_at >= POLL_S:
            self._read_at = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                self._flags = json.loads(self.path.read_text(encoding="utf-8"))
        return bool(self._flags.get(name))

    def stop(self) -> bool:
        return self._get("stop")

    def lost(self) -> bool:
        return self._get("lost")


def main(spec_path: str) -> int:
    """One process of a distributed run (``python -m training.distributed LAUNCH_FILE`` under torchrun)."""
    import torch

    from training.checkpoints import quiet_progress_bars

    # SIGTERM when torchrun's agent dies, as the agent has when the worker dies: a worker killed with its process
    # group (torchrun too, by SIGKILL) must not leave its training processes writing into a run that the next
    # worker resumes. An agent gone before this line is caught by the parent's pid changing.
    agent = os.getppid()
    _die_with_parent()
    if os.getppid() != agent:
        return 1
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s %(levelname)s rank {rank}] %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    out_dir = Path(spec["out_dir"])
    if spec.get("torch_threads"):
        torch.set_num_threads(int(spec["torch_threads"]))
    quiet_progress_bars()
    control = _Control(out_dir / CONTROL_FILE)

    def progress(record: dict[str, Any]) -> None:
        with open(out_dir / PROGRESS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=str) + "\n")

    train_set = [Example(image, list(captions)) for image, captions in spec["train"]]
    eval_set = [Example(image, list(captions)) for image, captions in spec["eval"]]
    try:
        result = train(
            TrainConfig.from_dict(spec["config"]),
            train_set,
            eval_set,
            out_dir,
            on_progress=progress,
            should_stop=control.stop,
            lost=control.lost,
            image_policy=ImagePolicy(**spec["policy"]),
        )
    except Exception as exc:
        error = f"{exc}" if isinstance(exc, CaptionerError) else f"{type(exc).__name__}: {exc}"
        (out_dir / f"error-{rank}.txt").write_text(" ".join(error.split()) + "\n", encoding="utf-8")
        log.exception("training process %d failed", rank)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        tmp = out_dir / f".{RESULT_FILE}.tmp"
        tmp.write_text(json.dumps(result.to_json()), encoding="utf-8")
        os.replace(tmp, out_dir / RESULT_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
