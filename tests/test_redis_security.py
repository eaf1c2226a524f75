"""Redis security settings for real: the documented ACL user runs a worker and the CLI, passwords work through
the CLI, and rediss:// without certificate settings is refused in one line."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from cli.main import cli
from producer.local import LocalRedis, WorkerProcess
from tests.conftest import settings_from, shape_files

ROOT = Path(__file__).resolve().parent.parent
ADMIN_PW, USER_PW = "admin-pw-1", "captioner-pw-2"


def documented_acl(password: str) -> list[str]:
    """The `redis-cli ACL SETUSER captioner ...` command of docs/operations.md, as arguments, with ``password``."""
    text = (ROOT / "docs" / "operations.md").read_text()
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", text, re.S) if "ACL SETUSER captioner" in b]
    assert len(blocks) == 1, "docs/operations.md should hold exactly one ACL SETUSER captioner block"
    words = shlex.split(blocks[0].replace("\\\n", " "))
    assert words[:3] == ["redis-cli", "ACL", "SETUSER"] and ">CHANGE-ME" in words
    return [f">{password}" if w == ">CHANGE-ME" else w for w in words[1:]]


def test_documented_acl_user_runs_worker_and_cli_and_is_refused_the_dangerous_rest(
    worker_env: dict[str, str], session_root: Path, tmp_path: Path
) -> None:
    refs = shape_files(session_root, "acl", 4, seed=8)
    with LocalRedis(password=ADMIN_PW) as server:  # the default user is the administrator, with a password
        admin = redis.Redis(port=server.port, password=ADMIN_PW)
        assert admin.execute_command(*documented_acl(USER_PW)) == b"OK"
        url = f"redis://captioner:{USER_PW}@127.0.0.1:{server.port}"
        env = {
            **worker_env,
            "CAPTIONER_BROKER_URL": f"{url}/0",
            "CAPTIONER_RESULT_BACKEND": f"{url}/0",
            "CAPTIONER_REDIS_URL": f"{url}/1",
            "CAPTIONER_KEY_PREFIX": "captioner",
            "CAPTIONER_CAPTION_QUEUE": "captions",
            "CAPTIONER_TRAINING_QUEUE": "training",
        }
        with WorkerProcess(env, log=tmp_path / "w.log") as proc:
            proc.wait_ready()
            runner = CliRunner()
            done = runner.invoke(cli, ["enqueue", *refs, "--job-id", "job-acl", "--wait", "--json"], env=env)
            assert done.exit_code == 0, done.output + proc.log_tail()
            status = json.loads(runner.invoke(cli, ["status", "job-acl", "--json"], env=env).stdout)
            assert (status["state"], status["ok"]) == ("done", 4)
            from common.messages import TASK_CAPTION
            from runtime.celery_app import create_app

            row = create_app(settings_from(env)).send_task(TASK_CAPTION, kwargs={"source": refs[0]}).get(timeout=60)
            assert row["status"] == "ok"
            doctor = runner.invoke(cli, ["doctor", "--json"], env=env)
        checks = {c["name"]: c for c in json.loads(doctor.stdout)}
        assert doctor.exit_code == 0, doctor.stdout
        assert checks["broker persistence"]["level"] == "warn"  # CONFIG denied: unknown, not a failure
        assert checks["broker access"]["level"] == "ok" and "required" in checks["broker access"]["detail"]
        assert checks["caption workers"]["level"] == "ok" and "tiny-git@" in checks["caption workers"]["detail"]
        # Nothing on the way was denied and swallowed (a refused command that a client ignores shows here),
        # except the doctor's CONFIG GET, which it reports as unknown.
        denied = [e for e in admin.execute_command("ACL", "LOG") if e[b"object"] != b"config|get"]
        assert not denied, denied
        assert "NOPERM" not in proc.log_path.read_text()

        user = redis.Redis.from_url(f"{url}/1")
        commands = [
            ("FLUSHALL",),
            ("FLUSHDB",),
            ("CONFIG", "SET", "appendonly", "no"),
            ("CONFIG", "GET", "*"),
            ("KEYS", "*"),
            ("SCAN", "0"),
            ("SCRIPT", "FLUSH"),
            ("FUNCTION", "FLUSH"),
            ("SWAPDB", "0", "1"),
            ("ACL", "LIST"),
            ("CLIENT", "LIST"),
            ("MONITOR",),
        ]
        for command in commands:
            with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions to run the '"):
                user.execute_command(*command)
        for command in [("SET", "otherapp:secret", "x"), ("GET", "otherapp:secret")]:
            with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions to access one of the keys"):
                user.execute_command(*command)
        # Inside a script, Redis says it in its own words, as a plain error.
        with pytest.raises(redis.ResponseError, match="The user executing the script can't access"):
            user.execute_command("EVAL", "return redis.call('SET','otherapp:x','1')", "0")
        ledger = redis.Redis(port=server.port, password=ADMIN_PW, db=1)
        assert ledger.exists("captioner:job:job-acl"), "the job survived every refused command"
        assert admin.get("otherapp:x") is None


def test_password_protected_redis_through_the_cli(images: Path) -> None:
    with LocalRedis(password="s3cret-pw") as server:
        env = {"CAPTIONER_BROKER_URL": server.url(0), "CAPTIONER_REDIS_URL": server.url(1)}
        runner = CliRunner()
        result = runner.invoke(cli, ["enqueue", str(images), "--job-id", "job-pw"], env=env)
        assert result.exit_code == 0 and "s3cret-pw" not in result.output, result.output
        status = json.loads(runner.invoke(cli, ["status", "job-pw", "--json"], env=env).stdout)
        assert status["total"] == 10 and status["pending"] == 10
        doctor = {c["name"]: c for c in json.loads(runner.invoke(cli, ["doctor", "--json"], env=env).stdout)}
        assert doctor["broker reachable"]["level"] == "ok" and "s3cret-pw" not in json.dumps(doctor)
        assert doctor["broker access"]["detail"] == "a password or ACL user is required"
        wrong = {**env, "CAPTIONER_BROKER_URL": server.url(0).replace("s3cret-pw", "wrong-pw")}
        result = runner.invoke(cli, ["jobs"], env={**wrong, "CAPTIONER_REDIS_URL": wrong["CAPTIONER_BROKER_URL"]})
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1 and "wrong-pw" not in result.stderr


@pytest.mark.parametrize("variable", ["CAPTIONER_BROKER_URL", "CAPTIONER_REDIS_URL", "CAPTIONER_RESULT_BACKEND"])
@pytest.mark.parametrize("command", [["jobs"], ["doctor"], ["worker"]])
def test_rediss_without_certificate_settings_is_one_clear_line(variable: str, command: list[str]) -> None:
    env = {variable: "rediss://:pw@cache.example:6380/0"}
    result = CliRunner().invoke(cli, command, env=env)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rediss:// needs CAPTIONER_REDIS_SSL_CA_CERTS"), lines
