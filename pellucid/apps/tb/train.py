"""Entry point of the tuberculosis chest X-ray app: ``python -m pellucid.apps.tb.train``.

Same options as ``pellucid train tb``; the recipe lives in ``task.toml`` beside this file.
"""
from __future__ import annotations

from pellucid.cli import train_entry

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return train_entry("tb", argv)


if __name__ == "__main__":
    raise SystemExit(main())
