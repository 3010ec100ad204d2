"""Entry point of the mpox skin-photo app: ``python -m pellucid.apps.mpox.train``.

Same options as ``pellucid train mpox``; the recipe lives in ``task.toml`` beside this file (an
ensemble: ``pellucid tune mpox`` scores it on grouped folds). For grouped stratified k-fold of one
model with mean ± sd: ``--folds 5 --config pellucid/apps/mpox/lpft.toml``.
"""
from __future__ import annotations

from pellucid.cli import train_entry

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return train_entry("mpox", argv)


if __name__ == "__main__":
    raise SystemExit(main())
