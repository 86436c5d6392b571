"""The composition root: build the parts of a mounted filesystem, run it, tear it down in reverse.

    volume (store lock, metadata, data file, cache)  ->  adapter  ->  pyfuse3 session  ->  trio loop

Order matters twice:
- The C extension for the operations pyfuse3 lacks (copy_file_range, fallocate) must be loaded before
  pyfuse3 is first imported, or its interposition of fuse_session_new does not take effect.
- The volume is committed and closed only after the session has stopped, so every request that was
  answered is in the last commit.

Durability: the volume commits every `commit_interval` seconds while it has changes, on fsync/fsyncdir,
and at unmount. A crash of the daemon loses at most the changes of the last interval that no fsync
covered; each block then reads as its old or its new bytes.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass, field

log = logging.getLogger("reflinkfs.mount")


@dataclass
class MountOptions:
    store: str
    mountpoint: str
    debug: bool = False
    fuse_options: list[str] = field(default_factory=list)
    cache: str = "shared"            # shared | inode | none
    cache_size: int = 256 << 20
    kernel_cache: bool = False
    commit_interval: float = 5.0
    lock_fd: int | None = None       # the store's lock, when the mount command took it (the volume owns it)


def fuse_option_set(opts: MountOptions) -> set[str]:
    s = {"fsname=reflinkfs:" + os.path.abspath(opts.store), "subtype=reflinkfs", "default_permissions"}
    for o in opts.fuse_options:
        s.update(x for x in o.split(",") if x)
    if opts.debug:
        s.add("debug")
    return s


def run(opts: MountOptions, ready=None) -> int:
    """Mount and serve until unmounted or signalled. `ready(message)` is called once the mount is live."""
    from . import extops
    ext_ok = extops.load(strict=False)   # before pyfuse3 is imported anywhere in this process
    import pyfuse3
    import trio

    from ..core.volume import Volume
    from ..core.cache import make_io
    from .adapter import ATTR_TIMEOUT, ENTRY_TIMEOUT, Operations
    from .ranges import RangeOps

    volume = Volume.open(opts.store, io_factory=make_io(opts.cache, opts.cache_size), lock_fd=opts.lock_fd)
    try:
        ops = Operations(volume, direct_io=not opts.kernel_cache,
                         status=lambda: {"clones": ranges.clones, "cloned_bytes": ranges.cloned_bytes,
                                         "extops": extops.counts() if ext_ok else None,
                                         "copy_file_range_handled": bool(ext_ok and extops.interposed()),
                                         "negotiated": extops.negotiated() if ext_ok else None,
                                         "code": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         "kernel_cache": opts.kernel_cache})
        ranges = RangeOps(ops)
        pyfuse3.init(ops, opts.mountpoint, fuse_option_set(opts))
        try:
            warning = None
            if ext_ok and extops.interposed():
                ranges.install()
                extops.set_read_handler(ops.read_parts)
                extops.set_write_handler(ops.write_now)
                extops.set_meta_handlers(lookup=ops.lookup_now, getattr=ops.getattr_now, unlink=ops.unlink_now,
                                         forget=ops.forget_now, entry_timeout=ENTRY_TIMEOUT,
                                         attr_timeout=ATTR_TIMEOUT)
                # ops.flush does nothing: no_flush spares every close() a FLUSH round trip
                extops.set_file_handlers(open=ops.open_now, create=ops.create_now, release=ops.release_now,
                                         direct_io=ops.direct_io, keep_cache=False, no_flush=True,
                                         tmpfile=ops.tmpfile_now)
                # POSIX ACLs: the kernel enforces them (FUSE_POSIX_ACL, asked for at INIT by pyfuse3 when
                # enable_acl is set) and the daemon applies default ACLs, which needs unmasked modes
                extops.set_dont_mask(True)
                ops.enable_acl = True
                extops.set_lseek_handler(ops.lseek_now)      # SEEK_DATA / SEEK_HOLE from the extent maps
                extops.set_dir_handlers(opendir=ops.opendir_now, readdir=ops.readdir_now,
                                        releasedir=ops.releasedir_now, looked_up=volume.looked_up)
            else:
                warning = ("warning: copy_file_range is not handled by this mount ("
                           f"{getattr(ext_ok, 'reason', None) or 'the interposition did not take effect'}); "
                           "copies will move bytes instead of sharing extents")
                log.error(warning)
            if ready:
                ready(warning)

            async def main():
                async with trio.open_nursery() as nursery:
                    ranges.nursery = nursery
                    nursery.start_soon(_commit_loop, ops, opts.commit_interval)
                    nursery.start_soon(_signals, nursery)
                    await pyfuse3.main()
                    nursery.cancel_scope.cancel()

            trio.run(main)
        finally:
            pyfuse3.close(unmount=True)
    finally:
        volume.close()
    return 0


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
