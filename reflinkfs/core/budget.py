"""How big the cache may be: a default that follows the machine, and giving memory back under pressure.

Guarantees:
- `default_budget(memory)` is a quarter of the memory the daemon may use: the machine's RAM, or its
  cgroup's `memory.max` when that is lower (a container). A quarter because the shared cache is the one
  copy of file data on this path (files are direct_io: the kernel's page cache holds none of it), yet it
  must leave the kernel room for everything else; it is what ZFS's ARC takes at least (its maximum is
  half of RAM, its minimum 1/32), halved, since reflinkfs's units are Python objects that the kernel
  cannot reclaim by itself.
- `Watch.decide(reading, held)` gives the budget for the next interval and, when it shrank it, why. It
  shrinks before the kernel has to reclaim or kill: when MemAvailable drops below a reserve (a tenth of
  the memory, at least 64 MiB), by what is missing; when the kernel reports memory stalls
  (/proc/pressure/memory "some" avg10 of PSI_SHRINK_PCT % or more), by a quarter of what is held. It
  grows back toward the default slowly (an eighth of it per interval) once MemAvailable is above twice the
  reserve and there are no stalls. It never goes below MIN_BUDGET nor above the default.
- A budget fixed with `--cache-size` is never changed: there is no Watch then.

Concurrency: `read_memory()` reads /proc and /sys; the mount runs it in a worker thread once per
interval (reading procfs is cheap, but the loop does nothing that may block). `Watch` itself is plain
arithmetic, called in the loop's thread, which owns the cache and applies the budget (cache.resize).
Every reading is a `Memory` value, so tests inject the memory they want.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

MiB = 1 << 20
MIN_BUDGET = 16 * MiB          # below this the cache stops serving sequential readers well
RESERVE_FRACTION = 10          # MemAvailable kept above total / RESERVE_FRACTION ...
RESERVE_MIN = 64 * MiB         # ... and above this
PSI_SHRINK_PCT = 10.0          # "some" stall share over 10 s that makes the cache give back a quarter
GROW_STEPS = 8                 # the budget regrows by default / GROW_STEPS per interval at most
INTERVAL = 1.0                 # seconds between readings


@dataclass(frozen=True)
class Memory:
    total: int                  # bytes the daemon may use: RAM, or the cgroup's limit when lower
    available: int              # bytes the kernel could hand out without swapping (MemAvailable)
    psi_some_avg10: float | None = None   # % of the last 10 s some task stalled on memory, or None


def _meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    out = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * 1024 if parts[1:] == ["kB"] else int(parts[0])
    return out


def _cgroup_limit() -> tuple[int, int] | None:
    """(memory.max, memory.current) of this process's cgroup (v2), or None when it has no limit."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), None)
        if rel is None:
            return None
        base = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as f:
            raw = f.read().strip()
        if raw == "max":
            return None
        with open(os.path.join(base, "memory.current")) as f:
            return int(raw), int(f.read().strip())
    except (OSError, ValueError, IndexError):
        return None


def _psi_some_avg10(path: str = "/proc/pressure/memory") -> float | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("some "):
                    for field in line.split()[1:]:
                        k, _, v = field.partition("=")
                        if k == "avg10":
                            return float(v)
    except (OSError, ValueError):
        return None
    return None


def read_memory() -> Memory:
    """The machine's memory as the daemon sees it (a container's limit counts)."""
    mi = _meminfo()
    total = mi["MemTotal"]
    available = mi.get("MemAvailable", mi.get("MemFree", 0))
    cg = _cgroup_limit()
    if cg is not None and cg[0] < total:
        limit, current = cg
        total = limit
        available = min(available, max(0, limit - current))
    return Memory(total, available, _psi_some_avg10())


def default_budget(memory: Memory) -> int:
    """A quarter of the memory the daemon may use (see the module's notes), at least MIN_BUDGET."""
    return max(MIN_BUDGET, memory.total // 4)


class Watch:
    """Decides the cache's budget from one memory reading after another (see the module's notes)."""

    def __init__(self, maximum: int):
        self.maximum = maximum
        self.budget = maximum

    def decide(self, m: Memory, held: int) -> tuple[int, str | None]:
        """The budget after reading m, with `held` bytes in the cache now, and why it shrank (None: it
        did not)."""
        reserve = max(RESERVE_MIN, m.total // RESERVE_FRACTION)
        target, reason = self.budget, None
        if m.available < reserve:
            missing = reserve - m.available
            target = min(self.budget, held) - missing
            reason = (f"MemAvailable {m.available // MiB} MiB was below the reserve of {reserve // MiB} MiB "
                      f"(a tenth of {m.total // MiB} MiB)")
        if m.psi_some_avg10 is not None and m.psi_some_avg10 >= PSI_SHRINK_PCT:
            by_psi = min(self.budget, held) - held // 4
            if by_psi < target:
                target = by_psi
                reason = (f"memory pressure: tasks stalled on memory {m.psi_some_avg10:.1f}% of the last 10 s "
                          f"(/proc/pressure/memory)")
        if reason is not None:
            target = max(MIN_BUDGET, target)
            if target < self.budget:
                self.budget = target
                return target, reason
            return self.budget, None
        calm = m.psi_some_avg10 is None or m.psi_some_avg10 < PSI_SHRINK_PCT / 2
        if self.budget < self.maximum and calm and m.available > 2 * reserve:
            step = min(self.maximum // GROW_STEPS, m.available - 2 * reserve)
            self.budget = min(self.maximum, self.budget + step)
        return self.budget, None


_libc = None


def give_back_freed() -> None:
    """Return the heap's free pages to the kernel (glibc keeps freed 64 KiB units for reuse otherwise);
    a no-op where malloc_trim does not exist."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
