"""The cache budget: a default that follows the machine, and memory given back under pressure
(core/budget.py), with memory readings injected; and the cache's side of it, `resize` (core/cache.py)."""
from __future__ import annotations

import pytest
import trio

from reflinkfs.core import budget
from reflinkfs.core.budget import MIN_BUDGET, Memory, Watch, default_budget
from reflinkfs.fuse import mount

MiB = 1 << 20
GiB = 1 << 30


def test_default_is_a_quarter_of_the_memory_and_never_tiny():
    assert default_budget(Memory(total=24 * GiB, available=20 * GiB)) == 6 * GiB
    assert default_budget(Memory(total=32 * MiB, available=8 * MiB)) == MIN_BUDGET


def test_a_cgroup_limit_below_the_ram_is_the_memory(monkeypatch):
    monkeypatch.setattr(budget, "_meminfo", lambda: {"MemTotal": 24 * GiB, "MemAvailable": 20 * GiB})
    monkeypatch.setattr(budget, "_cgroup_limit", lambda: (2 * GiB, 1536 * MiB))
    monkeypatch.setattr(budget, "_psi_some_avg10", lambda: 1.5)
    assert budget.read_memory() == Memory(total=2 * GiB, available=512 * MiB, psi_some_avg10=1.5)
    monkeypatch.setattr(budget, "_cgroup_limit", lambda: None)
    assert budget.read_memory() == Memory(total=24 * GiB, available=20 * GiB, psi_some_avg10=1.5)


def test_the_real_machine_can_be_read():
    m = budget.read_memory()
    assert 0 < m.available <= m.total and default_budget(m) >= MIN_BUDGET


def test_plenty_of_memory_keeps_the_budget():
    w = Watch(4 * GiB)
    assert w.decide(Memory(16 * GiB, 12 * GiB, 0.0), held=4 * GiB) == (4 * GiB, None)


def test_low_memavailable_gives_back_what_is_missing():
    w = Watch(4 * GiB)
    size, why = w.decide(Memory(16 * GiB, 1 * GiB, 0.0), held=3 * GiB)
    reserve = 16 * GiB // 10
    assert size == 3 * GiB - (reserve - 1 * GiB)
    assert "MemAvailable 1024 MiB" in why and "reserve" in why


def test_memory_stalls_give_back_a_quarter_of_what_is_held():
    w = Watch(4 * GiB)
    size, why = w.decide(Memory(16 * GiB, 8 * GiB, 25.0), held=2 * GiB)
    assert size == 2 * GiB - 2 * GiB // 4
    assert "pressure" in why and "25.0%" in why


def test_the_budget_never_goes_below_the_floor():
    w = Watch(4 * GiB)
    for _ in range(20):
        size, _ = w.decide(Memory(16 * GiB, 0, 90.0), held=w.budget)
    assert size == MIN_BUDGET
    assert w.decide(Memory(16 * GiB, 0, 90.0), held=MIN_BUDGET) == (MIN_BUDGET, None)   # no shrink to report


def test_the_budget_grows_back_slowly_once_memory_is_free_again():
    w = Watch(4 * GiB)
    w.decide(Memory(16 * GiB, 0, 50.0), held=4 * GiB)
    low = w.budget
    assert w.decide(Memory(16 * GiB, 2 * GiB, 0.0), held=low) == (low, None)   # below twice the reserve: wait
    sizes = [w.decide(Memory(16 * GiB, 12 * GiB, 0.0), held=low)[0] for _ in range(budget.GROW_STEPS + 2)]
    assert sizes[0] == low + 4 * GiB // budget.GROW_STEPS
    assert sizes == sorted(sizes) and sizes[-1] == 4 * GiB


class FakeCache:
    def __init__(self, budget_bytes: int, held: int):
        self.budget_bytes, self.held_bytes = budget_bytes, held
        self.last_shrink = None
        self.calls: list = []

    def resize(self, size: int, reason):
        self.calls.append((size, reason))
        freed = max(0, self.held_bytes - size)
        self.held_bytes -= freed
        self.last_shrink = {"from_bytes": self.budget_bytes}
        self.budget_bytes = size
        return freed


def test_the_mount_applies_the_watch_and_gives_freed_memory_back(monkeypatch):
    readings = iter([Memory(16 * GiB, 12 * GiB, 0.0), Memory(16 * GiB, 512 * MiB, 0.0)])
    trims = []

    def read():
        try:
            return next(readings)
        except StopIteration:
            raise OSError("no more readings") from None
    monkeypatch.setattr(budget, "read_memory", read)
    monkeypatch.setattr(budget, "give_back_freed", lambda: trims.append(1))
    cache = FakeCache(4 * GiB, 3 * GiB)
    trio.run(mount._memory_loop, cache, Watch(4 * GiB), 0)
    assert len(cache.calls) == 1 and "MemAvailable" in cache.calls[0][1]
    assert cache.budget_bytes < 3 * GiB and trims == [1]


@pytest.fixture
def cache():
    from reflinkfs.core.cache import UNIT, SharedCache
    c = SharedCache(None, None, None, budget=64 * UNIT)
    for u in range(64):
        c._put(u, object())
    yield c, UNIT
    c.close()


def test_resize_evicts_at_once_and_records_why(cache):
    c, unit = cache
    assert c.held_bytes == 64 * unit
    freed = c.resize(16 * unit, "because")
    assert freed == 48 * unit and c.held_bytes == 16 * unit == c.budget_bytes
    assert c.evictions == 48 and c.shrinks == 1
    s = c.last_shrink
    assert (s["from_bytes"], s["to_bytes"], s["freed_bytes"], s["reason"]) == (64 * unit, 16 * unit, 48 * unit,
                                                                                 "because")
    assert c.resize(32 * unit) == 0 and c.shrinks == 1       # growing is no shrink
    for u in range(100, 140):
        c._put(u, object())
    assert c.held_bytes == 32 * unit                          # the new budget holds
