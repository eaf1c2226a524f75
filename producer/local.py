"""Local processes for the demo and the tests: a throwaway redis-server and real caption worker processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Any

from common.errors import CaptionerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedis:
    """A redis-server on a free loopback port, with AOF and a password when asked; stopped on exit."""

    def __init__(self, *, appendonly: bool = False, password: str | None = None, maxmemory: str | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise CaptionerError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="captioner-redis-"))
        self.password = password
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", ""]
        args += ["--appendonly", "yes" if appendonly else "no", "--appendfsync", "always"]
        if password:
            args += ["--requirepass", password]
        if maxmemory:
            args += ["--maxmemory", maxmemory, "--maxmemory-policy", "noeviction"]
        self._args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.proc = subprocess.Popen(self._args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise CaptionerError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: what a crash looks like (AOF keeps what was fsynced)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _own_session_tied_to_parent() -> None:
    """In the child: a session of its own (so a signal reaches the whole group), and SIGTERM when the parent
    dies (Linux), so a killed test run or demo never leaves a worker consuming from the broker."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class WorkerProcess:
    """A real ``captioner worker`` process with its own environment; ready once its model is loaded."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        training: bool = False,
        log: Path | None = None,
        extra_args: list[str] | None = None,
        argv: list[str] | None = None,
    ) -> None:
        self.name = f"{'train' if training else 'caption'}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.args = [sys.executable, "-m", "cli.main", "worker", "--hostname", self.name]
        self.args += (["--training"] if training else []) + (extra_args or [])
        if argv is not None:  # any other command line, e.g. a plain `celery -A worker.celery_app worker`
            self.args = [*argv, "--hostname", self.name]
        self.log_path = log or Path(tempfile.mkstemp(prefix="captioner-worker-", suffix=".log")[1])
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_own_session_tied_to_parent
        )
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        """Wait for Celery's 'ready' line, which comes after the model is loaded (see tasks._warm_up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise CaptionerError(f"worker exited early; log:\n{self.log_tail()}")
            if b" ready." in self.log_path.read_bytes():
                return
            time.sleep(0.1)
        raise CaptionerError(f"worker not ready after {timeout:g}s; log:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM: Celery's warm shutdown finishes the tasks in hand, then exits."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int:
        """SIGKILL of the whole process group: a crash, nothing acked, nothing flushed."""
        return self._signal(signal.SIGKILL, 30)

    def _signal(self, sig: int, timeout: float) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(10)
        if self._log:
            self._log.close()
        return code

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.terminate()


class ServeProcess:
    """``transformers serve`` on a free loopback port with one model preloaded: a real OpenAI-compatible server
    (``/v1/chat/completions``, ``/v1/models``) for tests and benchmarks. Needs the ``serving`` extra of transformers.
    """

    def __init__(
        self, model_dir: Path, *, log: Path | None = None, device: str = "cpu", extra_args: list[str] | None = None
    ) -> None:
        self.port = free_port()
        self.model = str(model_dir)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        # The transformers CLI through this interpreter (its console script may not be on PATH).
        code = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; main()"
        self.args = [
            sys.executable,
            "-c",
            code,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--device",
            device,
            "--log-level",
            "warning",
            *(extra_args or []),
            self.model,
        ]
        self.log_path = log or Path(tempfile.mkstemp(prefix="captioner-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180) -> ServeProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_own_session_tied_to_parent
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # ready once /health answers (the model is preloaded before it listens)
            if self.proc.poll() is not None:
                raise CaptionerError(f"transformers serve exited early; log:\n{self.log_path.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                    if b" 200 " in s.recv(200):
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        tail = self.log_path.read_text()[-3000:]
        raise CaptionerError(f"transformers serve not ready after {timeout:g}s; log:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
