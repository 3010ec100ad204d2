"""Entry point of the waste-sorting app: ``python -m pellucid.apps.waste.train``.

Same options as ``pellucid train waste``; the recipe lives in ``task.toml`` beside this file. Export
with `pellucid export --model DIR --format onnx --int8`.
"""
from __future__ import annotations

from pellucid.cli import train_entry

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return train_entry("waste", argv)


if __name__ == "__main__":
    raise SystemExit(main())
