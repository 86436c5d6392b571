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


def coverage(runs) -> list[tuple[int, int, int]]:
    """How many of the (start, n[, weight]) runs cover each point: [(start, end, count)] for count != 0,
    sorted, adjacent pieces of equal count merged."""
    out: list[tuple[int, int, int]] = []
    prev_end = None
    for r in runs:                      # fast path: sorted, disjoint, unweighted (a file's extents)
        if len(r) > 2 or (prev_end is not None and r[0] < prev_end):
            break
        if out and out[-1][1] == r[0]:
            out[-1] = (out[-1][0], r[0] + r[1], 1)
        elif r[1] > 0:
            out.append((r[0], r[0] + r[1], 1))
        prev_end = r[0] + r[1]
    else:
        return out
    events: dict[int, int] = {}
    for r in runs:
        s, n = r[0], r[1]
        w = r[2] if len(r) > 2 else 1
        events[s] = events.get(s, 0) + w
        events[s + n] = events.get(s + n, 0) - w
    out = []
    cur = 0
    keys = sorted(events)
    for i, k in enumerate(keys):
        cur += events[k]
        if cur and i + 1 < len(keys):
            nk = keys[i + 1]
            if out and out[-1][1] == k and out[-1][2] == cur:
                out[-1] = (out[-1][0], nk, cur)
            else:
                out.append((k, nk, cur))
    return out
