"""Policy registry: ``get("quest", budget=64)`` builds a policy by name."""

from __future__ import annotations

REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: make the policy available under its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


def get(name: str, **kwargs):
    """Build the policy registered as ``name`` with ``kwargs``; ``ValueError`` if unknown."""
    if name not in REGISTRY:
        raise ValueError(f"name: unknown policy {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)
