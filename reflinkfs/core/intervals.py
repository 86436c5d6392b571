"""A set of half-open integer intervals, kept sorted and coalesced.

Used for the physical blocks allocated in the open transaction (which may be overwritten in place
because no committed state refers to them). Operations are O(log n + k) in the number of stored
intervals n and touched intervals k.
"""
from __future__ import annotations

import bisect


class IntervalSet:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        # first interval whose end >= start (touching counts, so it coalesces)
        i = bisect.bisect_left(self._ends, start)
        j = i
        while j < len(self._starts) and self._starts[j] <= end:
            start = min(start, self._starts[j])
            end = max(end, self._ends[j])
            j += 1
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_right(self._ends, start)
        j = i
        keep_s: list[int] = []
        keep_e: list[int] = []
        while j < len(self._starts) and self._starts[j] < end:
            if self._starts[j] < start:
                keep_s.append(self._starts[j])
                keep_e.append(start)
            if self._ends[j] > end:
                keep_s.append(end)
                keep_e.append(self._ends[j])
            j += 1
        self._starts[i:j] = keep_s
        self._ends[i:j] = keep_e

    def pieces(self, start: int, end: int):
        """Split [start, end) into (s, e, inside) pieces, in order."""
        pos = start
        i = bisect.bisect_right(self._ends, start)
        while pos < end:
            if i < len(self._starts) and self._starts[i] <= pos:
                e = min(end, self._ends[i])
                yield pos, e, True
                pos = e
                i += 1
            else:
                e = min(end, self._starts[i]) if i < len(self._starts) else end
                yield pos, e, False
                pos = e

    def __iter__(self):
        return iter(zip(self._starts, self._ends))
