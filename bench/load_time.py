"""What scale-to-zero costs: the seconds from starting a caption worker to its first message taken ("ready": the model
loaded and warmed up), with git-base-shaped random weights (176.6M parameters, safetensors on local disk), through a
redis-server of its own. On a pod add the image pull and the node's start, which this does not see.

    python -m bench.load_time [--device cpu|cuda] [--rounds 3] [--model git-base|tiny] [--work DIR]

Prints one line per round and the best; the first round also pays a cold page cache.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from bench.corpus import build_model


def _redis(port: int) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is needed (the worker needs a broker to be ready)")
    return subprocess.Popen(
        [server, "--port", str(port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )


def start_to_ready(model: Path, device: str, broker: str, log: Path) -> float:
    """Seconds from `captioner worker` starting to its "ready" line; then a warm shutdown."""
    from producer.local import WorkerProcess

    queue = f"load-{uuid.uuid4().hex[:6]}"
    env = {
        "CAPTIONER_BROKER_URL": broker,
        "CAPTIONER_MODEL": str(model),
        "CAPTIONER_DEVICE": device,
        "CAPTIONER_METRICS_PORT": "0",
        "CAPTIONER_CAPTION_QUEUE": queue,
        "HF_HUB_OFFLINE": "1",
    }
    started = time.perf_counter()
    worker = WorkerProcess(env, log=log).start()
    try:
        worker.wait_ready(timeout=900)
        return time.perf_counter() - started
    finally:
        worker.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="git-base", choices=["git-base", "tiny"], help="tiny: a smoke run.")
    parser.add_argument("--work", type=Path, help="Keep the model here (built once).")
    args = parser.parse_args()
    from producer.local import free_port

    work = args.work or Path(tempfile.mkdtemp(prefix="captioner-load-"))
    model = build_model(args.model, work / args.model)
    port = free_port()
    server = _redis(port)
    try:
        times = []
        for i in range(args.rounds):
            seconds = start_to_ready(model, args.device, f"redis://127.0.0.1:{port}/0", work / f"worker-{i}.log")
            times.append(seconds)
            print(f"round {i + 1}: {seconds:.1f} s from start to ready ({args.device})", flush=True)
        print(
            f"best: {min(times):.1f} s, worst: {max(times):.1f} s over {len(times)} rounds ({args.device}, "
            f"{args.model})"
        )
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(10)


if __name__ == "__main__":
    main()
