"""Entry point of the nucleus-type histopathology app: ``python -m pellucid.apps.nuclei.train``.

Same options as ``pellucid train nuclei``; the recipe lives in ``task.toml`` beside this file.
"""
from __future__ import annotations

from pellucid.cli import train_entry

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return train_entry("nuclei", argv)


if __name__ == "__main__":
    raise SystemExit(main())
