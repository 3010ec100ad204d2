"""pellucid benchmarks (speed, memory, quality): run with ``make bench`` or ``python -m bench [NAME...]``."""
