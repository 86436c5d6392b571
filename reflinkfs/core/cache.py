"""Block caches (placeholder until the shared cache lands): only the uncached path exists yet."""
from __future__ import annotations

from .blockio import UncachedIO


def make_io(mode: str, cache_size: int):
    if mode == "none":
        return UncachedIO
    raise ValueError(f"unknown cache mode {mode!r}")
