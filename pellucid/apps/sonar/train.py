"""Entry point of the sonar object-type app: ``python -m pellucid.apps.sonar.train``.

Same options as ``pellucid train sonar``; the recipe lives in ``task.toml`` beside this file.
"""
from __future__ import annotations

from pellucid.cli import train_entry

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return train_entry("sonar", argv)


if __name__ == "__main__":
    raise SystemExit(main())
