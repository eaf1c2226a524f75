"""The endpoint backend's orchestration overhead: our end-to-end rate against the same server driven directly.

One OpenAI-compatible server (``transformers serve`` with a tiny random LLaVA built offline, started here; or any
server given with ``--url`` and ``--model``), the same JPEGs and the same concurrency two ways:

- **direct**: this process posts every image's chat completion itself, ``--concurrency`` threads over one
  keep-alive client, with the very request bodies a worker sends (encoded beforehand, untimed): the server's own
  rate at that concurrency, what a hand-written script gets at best.
- **queued**: what a user runs: a redis-server, ``captioner worker --endpoint URL --model NAME`` with
  ``CAPTIONER_ENDPOINT_CONCURRENCY`` = ``--concurrency``, and ``JobClient.enqueue`` of the files as one job, timed
  from the start of the enqueue to the ledger's ``finished`` (reading, decoding and encoding the images included).

The ratio queued / direct is the share of the server's rate the whole system keeps. Rounds are interleaved and each
way keeps its best (a shared machine's load changes from minute to minute). Nothing fails on a low number.

    python -m bench.endpoint                                  # tiny LLaVA on this machine's CPU
    python -m bench.endpoint --images 256 --concurrency 32 --device cuda
    python -m bench.endpoint --url http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-VL-3B-Instruct
    python -m bench.endpoint --instant                        # a server that answers at once: our own ceiling
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def encoded_bodies(paths: list[Path], model: str, prompt: str, max_length: int) -> list[bytes]:
    """The request body a worker sends for each file (decoded by our rules, re-encoded as its upload JPEG)."""
    from common.messages import GenParams
    from common.settings import Settings
    from media.images import ImagePolicy, decode_image
    from model.endpoint import EndpointConfig, EndpointEngine

    settings = Settings(allowed_roots=[str(paths[0].parent)], model=model, endpoint_url="http://127.0.0.1:9/v1")
    engine = EndpointEngine(EndpointConfig.from_settings(settings))  # never connected: it only shapes the bodies
    policy = ImagePolicy.from_settings(settings)
    params = GenParams(max_length=max_length, prompt=prompt)
    out = []
    for path in paths:
        url = engine.prepare([decode_image(path.read_bytes(), policy)])[0]
        out.append(json.dumps(engine.body(url, params), separators=(",", ":")).encode())
    engine.close()
    return out


def direct(url: str, bodies: list[bytes], concurrency: int, api_key: str | None) -> dict[str, Any]:
    """Post every body with ``concurrency`` threads over one keep-alive client; images/s and the answers."""
    import httpx2

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx2.Client(trust_env=False, limits=limits, timeout=600) as client:

        def post(body: bytes) -> str:
            resp = client.post(f"{url}/chat/completions", content=body, headers=headers)
            resp.raise_for_status()
            return str(resp.json()["choices"][0]["message"]["content"] or "").strip()

        with ThreadPoolExecutor(concurrency) as pool:
            started = time.perf_counter()
            captions = list(pool.map(post, bodies))
            seconds = time.perf_counter() - started
    return {"seconds": seconds, "images_per_s": len(bodies) / seconds, "captions": captions}


class Queued:
    """A redis-server and a real caption worker on the endpoint; ``measure`` times one job end to end."""

    def __init__(
        self,
        workdir: Path,
        url: str,
        model: str,
        concurrency: int,
        max_length: int,
        image_dir: Path,
        worker_env: dict[str, str],
    ) -> None:
        from common.settings import Settings
        from producer.local import LocalRedis, WorkerProcess

        self.redis = LocalRedis()
        queue = f"bench-endpoint-{uuid.uuid4().hex[:8]}"
        env = {
            "CAPTIONER_BROKER_URL": self.redis.url(0),
            "CAPTIONER_RESULT_BACKEND": self.redis.url(0),
            "CAPTIONER_REDIS_URL": self.redis.url(1),
            "CAPTIONER_KEY_PREFIX": "bench",
            "CAPTIONER_CAPTION_QUEUE": queue,
            "CAPTIONER_ENDPOINT_URL": url,
            "CAPTIONER_MODEL": model,
            "CAPTIONER_MAX_LENGTH": str(max_length),
            "CAPTIONER_ENDPOINT_CONCURRENCY": str(concurrency),
            "CAPTIONER_ALLOWED_ROOTS": str(image_dir),
            "CAPTIONER_METRICS_PORT": "0",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            **worker_env,
        }
        self.worker = WorkerProcess(env, log=workdir / "endpoint-worker.log").start()
        self.settings = Settings(
            broker_url=self.redis.url(0),
            result_backend=self.redis.url(0),
            redis_url=self.redis.url(1),
            key_prefix="bench",
            caption_queue=queue,
            max_length=max_length,
        )
        self.max_length = max_length
        self.client: Any = None

    def ready(self) -> None:
        from producer.jobs import JobClient

        self.worker.wait_ready(180)
        self.client = JobClient(self.settings)

    def measure(self, paths: list[Path], prompt: str) -> dict[str, Any]:
        from common.messages import GenParams

        job_id = f"bench-{uuid.uuid4().hex[:8]}"
        started = time.time()
        self.client.enqueue(
            [str(p) for p in paths], job_id=job_id, params=GenParams(max_length=self.max_length, prompt=prompt)
        )
        info = self.client.wait(job_id, timeout=60 + 30 * len(paths), poll_s=0.02, on_tick=lambda _: None)
        if info.ok != len(paths):
            raise RuntimeError(f"{info.ok} of {len(paths)} captioned; see {self.worker.log_path}")
        seconds = (info.finished or time.time()) - started
        by_ref = {row["ref"]: row.get("caption") or "" for row in self.client.results(job_id)}
        return {"seconds": seconds, "images_per_s": len(paths) / seconds, "captions": [by_ref[str(p)] for p in paths]}

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.worker.terminate()
        self.redis.stop()


class InstantServer:
    """An OpenAI-compatible server that answers at once, the same caption for every image (``--instant``): the
    server costs nothing, so the ratio shows the ceiling of our own side (reading, decoding, re-encoding, the
    ledger) rather than the server's rate."""

    MODEL = "instant"

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        message = {"role": "assistant", "content": "a photo of something"}
        answer = json.dumps(
            {
                "object": "chat.completion",
                "model": self.MODEL,
                "usage": {"completion_tokens": 4},
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
            }
        )
        models = json.dumps({"object": "list", "data": [{"id": self.MODEL, "object": "model"}]})

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def reply(self, body: str) -> None:
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self.reply(models)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.reply(answer)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.corpus import make_images
    from common.settings import Settings
    from producer.local import ServeProcess

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-endpoint-"))
    paths, origin = make_images(workdir / "images", args.images)
    prompt = args.prompt or str(Settings.model_fields["endpoint_prompt"].default)
    server: Any = None
    url, model = args.url, args.model
    if args.instant:
        server = InstantServer()
        url, model = server.url, InstantServer.MODEL
    elif url is None:
        from training.tiny_vlm import build_tiny_llava

        model_dir = workdir / "tiny-llava"
        if not (model_dir / "model.safetensors").is_file():
            build_tiny_llava(model_dir)
        server = ServeProcess(model_dir, log=workdir / "serve.log", device=args.device).start()
        url, model = server.url, server.model
    api_key = os.environ.get("CAPTIONER_ENDPOINT_API_KEY") or os.environ.get("OPENAI_API_KEY")
    queued = Queued(
        workdir,
        url,
        model,
        args.concurrency,
        args.max_length,
        paths[0].parent,
        dict(e.split("=", 1) for e in args.worker_env),
    )
    try:
        bodies = encoded_bodies(paths, model, prompt, args.max_length)
        direct(url, bodies[:2], 2, api_key)  # warm-up, untimed (first requests load kernels and caches)
        queued.ready()
        queued.measure(paths[:2], prompt)
        rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "queued": []}
        for _ in range(args.rounds):
            rounds["direct"].append(direct(url, bodies, args.concurrency, api_key))
            rounds["queued"].append(queued.measure(paths, prompt))
    finally:
        queued.close()
        if server is not None:
            server.stop()
    best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in rounds.items()}
    same = sum(a == b for a, b in zip(best["direct"]["captions"], best["queued"]["captions"], strict=True))
    return {
        "server": "instant (answers at once)"
        if args.instant
        else "transformers serve, tiny random LLaVA"
        if server is not None
        else url,
        "model": model,
        "device": "-" if args.instant else args.device if server is not None else "the server's",
        "images": len(paths),
        "image_origin": origin,
        "concurrency": args.concurrency,
        "max_length": args.max_length,
        "direct_images_per_s": round(best["direct"]["images_per_s"], 2),
        "queued_images_per_s": round(best["queued"]["images_per_s"], 2),
        "ratio": round(best["queued"]["images_per_s"] / best["direct"]["images_per_s"], 3),
        "same_captions": f"{same}/{len(paths)}",
        "rounds_images_per_s": {k: [round(r["images_per_s"], 2) for r in v] for k, v in rounds.items()},
    }


def markdown(result: dict[str, Any]) -> str:
    return (
        "| server | device | images | concurrency | direct img/s | queued img/s | queued / direct | same captions |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
        f"| {result['server']} | {result['device']} | {result['images']} | {result['concurrency']} | "
        f"{result['direct_images_per_s']} | {result['queued_images_per_s']} | {result['ratio']} | "
        f"{result['same_captions']} |\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.endpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an OpenAI-compatible server's API base; default: start transformers serve")
    parser.add_argument("--model", help="the name the --url server serves")
    parser.add_argument(
        "--instant", action="store_true", help="a server that answers at once instead: the ceiling of our own side"
    )
    parser.add_argument("--device", default="cpu", help="device of the transformers serve started here")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--prompt", help="default: CAPTIONER_ENDPOINT_PROMPT's default")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker-env", action="append", default=[], metavar="CAPTIONER_NAME=VALUE")
    parser.add_argument("--workdir", help="keep images, model and logs here")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results-endpoint"))
    args = parser.parse_args(argv)
    if (args.url is None) != (args.model is None):
        parser.error("--url and --model go together")
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "endpoint.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "endpoint.md").write_text(markdown(result))
    print(markdown(result))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
