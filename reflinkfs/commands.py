"""Commands that work on a mounted filesystem: mount, umount, clone, stat, df, status."""
from __future__ import annotations


def add_parsers(sub) -> None:
    pass
