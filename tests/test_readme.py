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
