"""The README stays true: every setting documented, the two quick-start commands, CI runs the test one."""

from __future__ import annotations

from pathlib import Path

from worker.settings import Settings

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
    import worker.errors as errors

    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    missing = [code for code in errors.ITEM_ERROR_CODES if f"`{code}`" not in page]
    operator = [errors.BrokerUnavailable, errors.UnknownJob, errors.SourceError, errors.NothingToEnqueue,
                errors.ConfigError, errors.ModelLoadError, errors.UnsafeCheckpoint, errors.InvalidMessage]  # fmt: skip
    missing += [cls.__name__ for cls in operator if cls.__name__ not in page]
    assert not missing, f"docs/troubleshooting.md lacks {missing}"


def test_docs_name_only_settings_that_exist() -> None:
    import re

    known = {f"CAPTIONER_{n.upper()}" for n in Settings.model_fields}
    for doc in ("README.md", "docs/operations.md", "docs/troubleshooting.md", "docs/integration.md"):
        named = set(re.findall(r"CAPTIONER_[A-Z_]+[A-Z]", (ROOT / doc).read_text()))
        assert named <= known, f"{doc} names unknown settings: {sorted(named - known)}"
