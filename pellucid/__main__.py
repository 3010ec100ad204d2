"""``python -m pellucid`` — the same command line as the ``pellucid`` script."""
from __future__ import annotations

from pellucid.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
