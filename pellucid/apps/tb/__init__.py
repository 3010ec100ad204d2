"""Tuberculosis vs normal chest X-ray app (see ``task.toml``)."""
__all__: list[str] = []
