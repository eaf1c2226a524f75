"""The code blocks of README.md and docs/integration.md run, as written, against a real worker."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / "tests" / "node" / "node_modules"


def blocks(doc: str, lang: str) -> list[str]:
    text = (ROOT / doc).read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


EXAMPLES = [(doc, lang, i, code) for doc in ("README.md", "docs/integration.md") for lang in ("python", "js")
            for i, code in enumerate(blocks(doc, lang))]  # fmt: skip


def test_the_docs_have_python_and_node_examples() -> None:
    langs = {(doc, lang) for doc, lang, _, _ in EXAMPLES}
    assert {("README.md", "python"), ("README.md", "js"), ("docs/integration.md", "js")} <= langs
    assert sum(1 for doc, lang, _, _ in EXAMPLES if doc == "docs/integration.md" and lang == "python") >= 2


@pytest.mark.usefixtures("caption_worker")
@pytest.mark.parametrize(("doc", "lang", "index", "code"), EXAMPLES, ids=[f"{d}-{la}-{i}" for d, la, i, _ in EXAMPLES])
def test_example_runs_against_a_real_worker(
    doc: str, lang: str, index: int, code: str, worker_env: dict[str, str], images: Path
) -> None:
    image = str(sorted(images.glob("*.jpg"))[0])
    env = {**os.environ, **worker_env, "IMAGE": image, "PYTHONPATH": str(ROOT), "NODE_PATH": str(NODE_MODULES)}
    if lang == "python":
        argv = [sys.executable, "-c", code]
    else:
        node = shutil.which("node")
        assert node, "node is needed for the Node.js examples (it is on every machine of this project)"
        assert NODE_MODULES.is_dir(), "run `make setup` (it installs tests/node with npm ci)"
        argv = [node, "-e", code]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "the example printed nothing"
    assert not proc.stdout.startswith("error"), proc.stdout  # the first image is captioned
