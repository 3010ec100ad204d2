"""pellucid benchmarks (speed, memory, quality): run with ``make bench`` or ``python -m bench [NAME...]``."""

from pathlib import Path


def write_table(lines: list[str], out: Path) -> str:
    """Join markdown ``lines``, write them to ``out`` (folders created), print and return the text."""
    table = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)
    return table
