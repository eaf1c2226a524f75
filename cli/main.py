"""The ``captioner`` command line: every command group registered on one click group. Nothing imports this module;
the console script calls ``main``. Never imports torch: each command imports what it needs when it runs."""

from __future__ import annotations

from cli import exporting, jobs, models, ops, workers  # noqa: F401  (each registers its commands)
from cli.base import cli
from exports import FORMATS

__all__ = ["FORMATS", "cli", "main"]


def main() -> None:
    cli(prog_name="captioner")


if __name__ == "__main__":
    main()
