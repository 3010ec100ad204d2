"""Entry point of the snow-on-pavement ensemble app: ``python -m pellucid.apps.snow.train``.

Same options as ``pellucid train snow``; the recipe lives in ``task.toml`` beside this file. The
default recipe trains an ensemble (see task.toml).
"""
from __future__ import annotations

from pellucid.cli import train_entry

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return train_entry("snow", argv)


if __name__ == "__main__":
    raise SystemExit(main())
