"""copy_file_range and fallocate: the two operations pyfuse3 does not register, served by the core.

The C extension (`extops`) hands each request to these handlers synchronously inside pyfuse3's request
loop. The core call runs to completion right there (it never awaits, like every other handler), so the
reply is sent before the next request is read and no locking is needed.

copy_file_range becomes `Volume.clone_range`: whole blocks are shared, never copied. The kernel has already
done what copy_file_range(2) documents before asking us: it rejects overlapping ranges of one file,
directories, files opened without the right modes and O_APPEND destinations, and returns 0 for a source
offset at or past EOF; the core checks the same things again because `reflinkfs clone` reaches it too.
"""
from __future__ import annotations

import errno
import logging

from ..errors import FsError

log = logging.getLogger("reflinkfs.fuse")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


class RangeOps:
    def __init__(self, ops):
        self.ops = ops
        self.vol = ops.vol
        self.nursery = None
        self.clones = 0
        self.cloned_bytes = 0

    def install(self) -> None:
        from . import extops
        extops.set_handlers(copy_file_range=self.copy_file_range, fallocate=self.fallocate)

    def _answer(self, req, fn, *args) -> None:
        try:
            result = fn(*args)
        except FsError as e:
            if e.errno == errno.EIO:
                log.error("%s: %s", fn.__name__, e.message)
            req.reply_err(e.errno)
            return
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            req.reply_err(errno.EIO)
            return
        if result is None:
            req.reply_err(0)
        else:
            req.reply_write(result)

    def copy_file_range(self, req, ino_in, fh_in, off_in, ino_out, fh_out, off_out, length, flags):
        self._answer(req, self._clone, fh_in, off_in, fh_out, off_out, length, flags)

    def _clone(self, fh_in, off_in, fh_out, off_out, length, flags):
        if flags:
            raise FsError(errno.EINVAL)
        src, dst = self.ops.handle(fh_in), self.ops.handle(fh_out)
        done = self.vol.clone_range(src.ino, off_in, dst.ino, off_out, length)
        self.clones += 1
        self.cloned_bytes += done
        return done

    def fallocate(self, req, ino, fh, mode, offset, length):
        self._answer(req, self._fallocate, fh, mode, offset, length)

    def _fallocate(self, fh, mode, offset, length):
        h = self.ops.handle(fh)
        keep = bool(mode & FALLOC_FL_KEEP_SIZE)
        if mode & FALLOC_FL_PUNCH_HOLE:
            if mode != FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
                raise FsError(errno.EOPNOTSUPP)
            self.vol.punch_hole(h.ino, offset, length)
        elif mode & FALLOC_FL_ZERO_RANGE:
            if mode & ~(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
                raise FsError(errno.EOPNOTSUPP)
            self.vol.zero_range(h.ino, offset, length, keep_size=keep)
        elif mode & ~FALLOC_FL_KEEP_SIZE:
            raise FsError(errno.EOPNOTSUPP)
        else:
            self.vol.allocate(h.ino, offset, length, keep_size=keep)
        return None
