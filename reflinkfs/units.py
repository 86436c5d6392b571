"""Sizes on the command line: bytes, or a number with a suffix K, M, G or T (powers of 1024)."""
from __future__ import annotations

import argparse


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use bytes or a suffix K, M, G, T)") from None
