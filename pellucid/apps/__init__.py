"""Task apps: one folder per task with ``task.toml`` (the TaskSpec as data) and ``train.py``."""
__all__: list[str] = []
