"""What the ``pellucid`` command modules share: the one-line :class:`UserError`, where sample data
is looked for, and the summary printed after training.

The command line is :mod:`pellucid.cli` (parser, dispatch, the commands that use model folders) and
:mod:`pellucid.cli_train` (``train`` and ``init-task``); both import this module, which imports no
heavy module at import time.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["UserError", "default_data_root", "resolve_data", "print_summary"]


class UserError(Exception):
    """An error the user can fix; printed as one line."""


def default_data_root() -> Path:
    """Where the sample data of the tasks is looked for: ``PELLUCID_DATA``, else ``../shared/data``."""
    env = os.environ.get("PELLUCID_DATA")
    return Path(env) if env else Path("../shared/data")


def resolve_data(task, data: str | None) -> Path:
    """``--data``, else the task's sample data under :func:`default_data_root` (UserError when absent)."""
    if data:
        return Path(data)
    root = default_data_root()
    # PELLUCID_DATA may point at the task folder itself or at the folder of all tasks.
    for cand in (root / task.default_data, root):
        if (cand / "manifest.csv").exists() or (cand.is_dir() and any(
                (cand / c).is_dir() for c in task.classes)):
            return cand
    raise UserError(f"no data for task {task.name!r}: looked in {root / task.default_data} and {root}; "
                    f"pass --data DIR or set PELLUCID_DATA=DIR (a folder with manifest.csv or one sub-folder per class)")


def print_summary(folder: Path) -> None:
    """The model folder, its test metrics and time, printed after training."""
    from pellucid.core.card import CARD_FILE, read_card

    if not (Path(folder) / CARD_FILE).exists():
        return
    card = read_card(folder)
    from pellucid.core.metrics import format_metrics

    print(f"model folder: {folder}")
    if card.metrics.get("metrics"):
        print(f"metrics:      {Path(folder) / 'metrics.json'} (test split, n={card.metrics.get('n')})")
        print(format_metrics(card.metrics))
    else:
        print(f"metrics:      {card.metrics.get('note') or 'none recorded'}")
    print(f"time: {card.training.seconds if card.training else None} s; weights: {card.weight_source}")
