"""The README stays true: every setting documented, the two quick-start commands, CI runs the test one."""

from __future__ import annotations

from pathlib import Path

from common.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented_with_its_env_name() -> None:
    missing = [n for n in Settings.model_fields if f"`CAPTIONER_{n.upper()}`" not in README]
    assert not missing, f"README lacks settings: {missing}"


def test_quick_start_has_the_two_commands_and_ci_runs_the_test_one() -> None:
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "make demo" in quick and "make test" in quick
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_troubleshooting_covers_every_named_error() -> None:
    import common.errors as errors

    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    missing = [code for code in errors.ITEM_ERROR_CODES if f"`{code}`" not in page]
    operator = [
        errors.BrokerUnavailable,
        errors.UnknownJob,
        errors.SourceError,
        errors.NothingToEnqueue,
        errors.ConfigError,
        errors.ModelLoadError,
        errors.UnsafeCheckpoint,
        errors.InvalidMessage,
    ]
    missing += [cls.__name__ for cls in operator if cls.__name__ not in page]
    assert not missing, f"docs/troubleshooting.md lacks {missing}"


def test_docs_name_only_settings_that_exist() -> None:
    import re

    known = {f"CAPTIONER_{n.upper()}" for n in Settings.model_fields}
    # The test suite's own variables (tests/conftest.py reads them) are named in the README's testing section too.
    known |= set(re.findall(r"CAPTIONER_TEST_[A-Z_]+[A-Z]", (ROOT / "tests" / "conftest.py").read_text()))
    for doc in ("README.md", "docs/operations.md", "docs/troubleshooting.md", "docs/integration.md"):
        named = set(re.findall(r"CAPTIONER_[A-Z_]+[A-Z]", (ROOT / doc).read_text()))
        assert named <= known, f"{doc} names unknown settings: {sorted(named - known)}"


def test_every_captioner_command_line_in_the_docs_parses() -> None:
    """Shell blocks hold placeholders (JOB, DATA), so they are not run; each command and option must exist."""
    import re
    import shlex

    import click

    from cli.main import cli

    lines = []
    for doc in ("README.md", "docs/operations.md", "docs/troubleshooting.md"):
        for block in re.findall(r"```sh\n(.*?)```", (ROOT / doc).read_text(), flags=re.S):
            lines += [ln.split("#")[0] for ln in block.splitlines()]
    calls = [part.strip() for ln in lines for part in re.split(r"\s{2,}", ln) if part.strip().startswith("captioner ")]
    assert len(calls) > 10
    for call in calls:
        words = shlex.split(call.replace("|", " "))
        command = cli.commands.get(words[1])
        assert isinstance(command, click.Command), f"{call}: no command {words[1]!r}"
        known = {o for p in command.params for o in getattr(p, "opts", [])}
        unknown = [w for w in words[2:] if w.startswith("--") and w.split("=")[0] not in known]
        assert not unknown, f"{call}: unknown options {unknown}"
