"""pellucid benchmarks (speed, memory, quality): run with ``make bench`` or ``python -m bench [NAME...]``."""

from pathlib import Path


def write_table(lines: list[str], out: Path) -> str:
    """Join markdown ``lines``, write them to ``out`` (folders created), print and return the text."""
    table = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)
    return table


def sample_data(task: str, name: str | None = None, data: str | None = None) -> Path | None:
    """The data folder a screen of the recipe search's folds reads: ``data``, else ``../shared/data/<name>``, else the
    task's own sample data; ``None`` (and a line saying so) when it is absent."""
    from pellucid.core.tasks import get_task

    folder = Path(data or f"../shared/data/{name or get_task(task).default_data or task}")
    if not folder.exists():
        print(f"skipped: {folder} is absent (the sample data sit in ../shared/data)")
        return None
    return folder
