"""The composition root: build the parts of a mounted filesystem, run it, tear it down in reverse.

    volume (store lock, metadata, data file, cache)  ->  adapter  ->  extops table  ->  pyfuse3 session
                                                                                     ->  trio loop

pyfuse3 owns the session and the request loop; extops answers every request with the adapter's methods
(see extops' docstring). Order matters twice:
- extops must be loaded before pyfuse3 is first imported, or its table never reaches the session; the
  mount refuses to go on without it (pyfuse3 alone would have no operations to call).
- The volume is committed and closed only after the session has stopped, so every request that was
  answered is in the last commit.

Durability: the volume commits every `commit_interval` seconds while it has changes, on fsync/fsyncdir,
and at unmount, however the unmount came (`reflinkfs umount`, the system's `umount`, SIGTERM), with
SIGTERM, SIGINT and SIGHUP ignored during that last commit (`signals_ignored`). A crash of the daemon
loses at most the changes of the last interval that no fsync covered; each block then reads as its old
or its new bytes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("reflinkfs.mount")


@dataclass
class MountOptions:
    store: str
    mountpoint: str
    debug: bool = False
    fuse_options: list[str] = field(default_factory=list)
    cache: str = "shared"            # shared | inode | none
    cache_size: int | None = None    # bytes; None: chosen from the machine's memory, lowered under pressure
    kernel_cache: bool = False
    commit_interval: float = 5.0
    lock_fd: int | None = None       # the store's lock, when the mount command took it (the volume owns it)
    passthrough: str = "auto"        # auto: whole files opened read-only go to the kernel if it can; off


def fuse_option_set(opts: MountOptions) -> set[str]:
    s = {"fsname=reflinkfs:" + os.path.abspath(opts.store), "subtype=reflinkfs", "default_permissions"}
    for o in opts.fuse_options:
        s.update(x for x in o.split(",") if x)
    if opts.debug:
        s.add("debug")
    return s


def run(opts: MountOptions, ready=None) -> int:
    """Mount and serve until unmounted or signalled. `ready()` is called once the mount is live."""
    from ..errors import StoreError
    from . import extops
    loaded = extops.load(strict=False)   # before pyfuse3 is imported anywhere in this process
    if not loaded:
        raise StoreError(f"{opts.mountpoint}: cannot mount: {loaded.reason}")
    import pyfuse3
    import trio

    from ..core.cache import CacheBase, make_io
    from ..core.volume import Volume
    from ..meta.schema import SEGS_NAME
    from .adapter import ATTR_TIMEOUT, ENTRY_TIMEOUT, Operations
    from .passthrough import Passthrough, has_cap_sys_admin

    started = time.monotonic()
    small = os.environ.get("REFLINKFS_SMALL_FILE_BYTES")     # for tests and benchmarks: see Volume._place
    if small is not None and not small.isdigit():
        raise StoreError(f"REFLINKFS_SMALL_FILE_BYTES={small!r}: give a number of bytes")
    cache_size, source, watch = _cache_budget(opts)
    volume = Volume.open(opts.store, io_factory=make_io(opts.cache, cache_size), lock_fd=opts.lock_fd)
    if small is not None:
        volume.small_file_bytes = int(small)
    pt = Passthrough(os.path.join(opts.store, SEGS_NAME), wanted=passthrough_refused(opts, has_cap_sys_admin()),
                     register=extops.backing_open, unregister=extops.backing_close,
                     negotiated=extops.negotiated)
    try:
        if isinstance(volume.io, CacheBase):
            volume.io.budget_source = source
        else:
            watch = None                  # no cache: nothing to size
        ops = Operations(volume, acl_enabled=lambda: bool((extops.negotiated() or {}).get("posix_acl")),
                         invalidate=lambda ino: pyfuse3.invalidate_inode(ino, False), passthrough=pt,
                         status=lambda: {"extops": extops.counts(), "negotiated": extops.negotiated(),
                                         "copy_file_range_handled": extops.interposed(),
                                         "code": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         "kernel_cache": opts.kernel_cache, "pid": os.getpid(),
                                         "commit_interval_s": opts.commit_interval,
                                         "fuse_options": sorted(fuse_option_set(opts)),
                                         "uptime_s": time.monotonic() - started})
        extops.serve(ops, ops.spawn, direct_io=not opts.kernel_cache, keep_cache=False,
                     entry_timeout=ENTRY_TIMEOUT, attr_timeout=ATTR_TIMEOUT, acl=True,
                     passthrough=pt.mode == "auto")
        pyfuse3.init(pyfuse3.Operations(), opts.mountpoint, fuse_option_set(opts))   # its table is replaced
        try:
            if not extops.interposed():
                raise StoreError(f"{opts.mountpoint}: cannot mount: the session did not take reflinkfs's "
                                 "table of operations (reflinkfs.fuse.extops did not interpose libfuse)")
            if ready:
                ready()

            async def main():
                async with trio.open_nursery() as nursery:
                    ops.nursery = nursery
                    nursery.start_soon(_commit_loop, ops, opts.commit_interval)
                    if watch is not None:
                        nursery.start_soon(_memory_loop, volume.io, watch)
                    nursery.start_soon(_signals, nursery)
                    await pyfuse3.main()
                    nursery.cancel_scope.cancel()

            trio.run(main)
        finally:
            pyfuse3.close(unmount=True)
    finally:
        pt.close()
        with signals_ignored():
            volume.close()
    return 0


def passthrough_refused(opts: MountOptions, cap_sys_admin: bool) -> str:
    """Why passthrough is not even asked of the kernel ('' when it is): what the kernel says comes at INIT."""
    from .passthrough import precheck
    if opts.passthrough == "off":
        return "turned off (--passthrough off)"
    if opts.kernel_cache:
        return "not with --kernel-cache (the kernel would cache files per inode besides)"
    return precheck(cap_sys_admin, os.uname().release)


@contextlib.contextmanager
def signals_ignored(signums=(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)):
    """The last commit, once the session has ended (`umount`, or a signal that already asked for the
    unmount), is not to be cut short: at shutdown systemd sends SIGTERM to every process left, and a FUSE
    daemon is still committing after `umount` has returned. Ignored here, as asked already; SIGKILL still
    works. The previous handlers come back afterwards."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in signums}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


async def _commit_loop(ops, interval: float) -> None:
    import trio
    from ..errors import FsError
    while True:
        await trio.sleep(interval)
        if ops.vol.dirty:
            try:
                await ops.commit()
            except FsError as e:      # e.g. the backing disk failed a sync: keep serving, try again later
                log.error("periodic commit failed: %s", e.message)


def _cache_budget(opts: MountOptions):
    """(budget bytes, how it was chosen, the Watch that adjusts it or None) for the mount's cache."""
    from ..core import budget
    if opts.cache_size is not None:
        return opts.cache_size, "fixed (--cache-size)", None
    mem = budget.read_memory()
    size = budget.default_budget(mem)
    return size, f"auto: a quarter of {mem.total >> 20} MiB, lowered under memory pressure", budget.Watch(size)


async def _memory_loop(cache, watch, interval: float | None = None) -> None:
    """Once an interval: read the machine's memory (in a thread) and give the cache the budget the Watch
    decides; what a shrink evicts is handed back to the kernel (malloc_trim, in a thread)."""
    import trio
    from ..core import budget
    interval = budget.INTERVAL if interval is None else interval
    while True:
        await trio.sleep(interval)
        try:
            mem = await trio.to_thread.run_sync(budget.read_memory)
        except (OSError, KeyError, ValueError) as e:
            log.error("cannot read the machine's memory (%s): the cache budget stays at %d bytes",
                      e, cache.budget_bytes)
            return
        old = cache.budget_bytes
        size, reason = watch.decide(mem, cache.held_bytes)
        if size == old:
            continue
        freed = cache.resize(size, reason)
        if cache.budget_bytes < old:
            log.info("cache budget %d -> %d MiB (%d MiB evicted): %s", old >> 20, cache.budget_bytes >> 20,
                     freed >> 20, reason)
        if freed:
            await trio.to_thread.run_sync(budget.give_back_freed)


async def _signals(nursery) -> None:
    import pyfuse3
    import trio
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for sig in signals:
            log.info("signal %d: unmounting", sig)
            pyfuse3.terminate()
            return


def setup_logging(debug: bool, log_path: str | None) -> None:
    handler: logging.Handler
    handler = logging.FileHandler(log_path) if log_path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
