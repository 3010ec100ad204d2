"""Entry point of the BPD app (public stand-in: paediatric pneumonia on PneumoniaMNIST): ``python -m
pellucid.apps.bpd.train``.

Same options as ``pellucid train bpd``; the recipe lives in ``task.toml`` beside this file. Add
`--checkpoint runs/tb-...` to start from a TB chest-X-ray model folder and `--folds 5` for k-fold
mean ± sd.
"""
from __future__ import annotations

from pellucid.cli import train_entry

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    return train_entry("bpd", argv)


if __name__ == "__main__":
    raise SystemExit(main())
