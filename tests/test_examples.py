"""The code blocks of README.md and docs/integration.md run, as written, against a real worker, and print the
caption the same tiny model gives in this process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MAX_LENGTH, direct_captions

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / "tests" / "node" / "node_modules"


def blocks(doc: str, lang: str) -> list[str]:
    text = (ROOT / doc).read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def expected_lines(code: str, caption) -> list[str]:
    """What an example prints for one image, from what it asks for; ``caption(max_length, num_beams)`` is the
    in-process caption. An error line is compared up to its message."""
    if "caption_many.v1" in code:  # one image by path, then inline bytes and a missing file in one list
        return [f"ok {caption(MAX_LENGTH, 1)}", f"ok {caption(30, 2)}", "error forbidden: "]
    if "JobClient" in code:  # the bulk job, max_length 30
        return [f"ok {caption(30, 1)}", "1 captioned, 0 failed"]
    if "max_length: 30" in code:  # the Node example of docs/integration.md
        return [f"ok {caption(30, 1)}"]
    if "row.caption" in code or 'row["caption"]' in code:  # the README's: the caption alone, worker defaults
        return [caption(MAX_LENGTH, 1)]
    raise AssertionError(f"an example without an expected output; add one here:\n{code}")


#: Blocks that are not clients of a worker: the webhook receiver (tests/test_callbacks.py runs it).
RECEIVERS = ("def verify_signature",)
EXAMPLES = [
    (doc, lang, i, code)
    for doc in ("README.md", "docs/integration.md")
    for lang in ("python", "js")
    for i, code in enumerate(blocks(doc, lang))
    if not any(r in code for r in RECEIVERS)
]


def test_the_docs_have_python_and_node_examples() -> None:
    langs = {(doc, lang) for doc, lang, _, _ in EXAMPLES}
    assert {("README.md", "python"), ("README.md", "js"), ("docs/integration.md", "js")} <= langs
    assert sum(1 for doc, lang, _, _ in EXAMPLES if doc == "docs/integration.md" and lang == "python") >= 2


@pytest.mark.usefixtures("caption_worker")
@pytest.mark.parametrize(("doc", "lang", "index", "code"), EXAMPLES, ids=[f"{d}-{la}-{i}" for d, la, i, _ in EXAMPLES])
def test_example_prints_the_caption_of_a_real_worker(
    doc: str, lang: str, index: int, code: str, worker_env: dict[str, str], images: Path, tiny_model: Path
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
    expected = expected_lines(code, lambda n, beams: direct_captions(tiny_model, [image], n, beams)[image])
    printed = proc.stdout.splitlines()
    assert len(printed) == len(expected), proc.stdout
    for line, want in zip(printed, expected, strict=True):
        assert line.startswith(want) if want.endswith(": ") else line == want, (line, want)
