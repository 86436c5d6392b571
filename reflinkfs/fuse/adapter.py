"""The FUSE adapter: translates pyfuse3 requests into calls on the core, and errors into errno.

It holds no filesystem logic. Every handler runs the core call to completion without an `await` in
between, so requests never interleave inside the core (trio runs one task at a time); the only state
here is the table of open file handles. (statfs, and a write that got ENOSPC right after a removal, may
first wait a few milliseconds for the kernel's FORGETs: before or between core calls, never inside one.)

Lookup counts: every entry handed to the kernel (lookup, create, mknod, mkdir, symlink, link, readdirplus)
is counted by the core until the kernel's FORGET, and an unlinked inode is freed only when neither an open
handle nor the kernel refers to it any more, as FUSE requires.

An exception that is not an `FsError` is a bug: it is logged with its traceback and answered with EIO,
because pyfuse3 would otherwise stop serving the whole mount.

Importing this module imports pyfuse3; the composition root (`mount.py`) loads the C extension for the
operations pyfuse3 lacks first, because the load order decides whether it takes effect.
"""
from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import stat
import time

import pyfuse3
import trio

from ..core import acl
from ..core.volume import Attr, Volume
from ..errors import FsError

log = logging.getLogger("reflinkfs.fuse")

ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0
FORGET_WINDOW = 1.0     # seconds after a removal during which statfs/ENOSPC wait for the kernel's forgets
FORGET_WAIT = 0.05      # ... and for at most this long
DIRENTPLUS_MIN = 160    # bytes a readdirplus entry takes at least (its entry and dirent headers, a name)

# Virtual extended attributes: how tools and the `reflinkfs` commands see inside a mount. They are not
# listed by listxattr (so `cp -a`/`tar --xattrs` never try to copy them) and cannot be set or removed,
# except clone-from, which is the write-only request behind `reflinkfs clone`.
VIRTUAL = b"user.reflinkfs."
XATTR_EXTENTS = b"user.reflinkfs.extents"     # a file's extent map, JSON; pages: ...extents.<n>
XATTR_STATUS = b"user.reflinkfs.status"       # on the root: cache, data-file and usage statistics
XATTR_CLONE = b"user.reflinkfs.clone-from"    # set on a file to "<inode>" of a file this process has open
EXTENTS_PAGE = 1500                            # keeps a page under the kernel's 64 KiB xattr limit


def _errno_of(exc: Exception, op: str, args: tuple) -> int:
    """The errno a failed operation answers with; what the operator must see is logged here."""
    if isinstance(exc, FsError):
        if exc.errno == errno.EIO:
            log.error("%s: %s", op, exc.message)
        return exc.errno
    if isinstance(exc, OSError):
        log.error("%s: %s", op, exc)
        return exc.errno or errno.EIO
    log.error("internal error in %s%r", op, args[:3], exc_info=exc)
    return errno.EIO


def _translate(fn):
    """Domain errors become FUSEError(errno) here, at the boundary, and nowhere else."""
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except Exception as e:
            raise pyfuse3.FUSEError(_errno_of(e, fn.__name__, args)) from None
    return wrapper


class Handle:
    __slots__ = ("ino", "readable", "pid")

    def __init__(self, ino: int, flags: int, pid: int):
        self.ino = ino
        self.readable = (flags & os.O_ACCMODE) in (os.O_RDONLY, os.O_RDWR)
        self.pid = pid


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False
    enable_acl = False      # mount.py turns it on when extops can have modes passed unmasked (set_dont_mask)

    def __init__(self, volume: Volume, direct_io: bool = True, status=None):
        super().__init__()
        self.vol = volume
        self.direct_io = direct_io
        self.status = status or (lambda: {})      # extra statistics from the composition root
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._removed_at = -FORGET_WINDOW      # monotonic time of the last unlink/rmdir/rename
        self._commit_lock = trio.Lock()
        self._syncing: trio.Event | None = None   # set while a commit syncs the data file in a thread

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def stat_tuple(a: Attr) -> tuple:
        """The attributes the kernel gets, in the order of extops.set_meta_handlers' replies."""
        return (a.ino, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.size, 4096, a.blocks * 8,
                a.atime_ns, a.mtime_ns, a.ctime_ns)

    @classmethod
    def entry(cls, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        (e.st_ino, e.st_mode, e.st_nlink, e.st_uid, e.st_gid, e.st_rdev, e.st_size, e.st_blksize,
         e.st_blocks, e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns) = cls.stat_tuple(a)
        e.generation = 0
        e.entry_timeout = ENTRY_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        return e

    def _ref(self, a: Attr) -> pyfuse3.EntryAttributes:
        """An entry for the kernel, which counts it as a lookup until it sends forget (see Volume.looked_up)."""
        self.vol.looked_up(a.ino)
        return self.entry(a)

    # -- the handlers extops calls synchronously (see mount.py): a result, an errno, or None --------
    def lookup_now(self, parent: int, name: bytes):
        try:
            a = self.vol.lookup(parent, name)
        except Exception as e:
            return _errno_of(e, "lookup", (parent, name))
        self.vol.looked_up(a.ino)
        return self.stat_tuple(a)

    def getattr_now(self, ino: int):
        try:
            return self.stat_tuple(self.vol.getattr(ino))
        except Exception as e:
            return _errno_of(e, "getattr", (ino,))

    def unlink_now(self, parent: int, name: bytes) -> int:
        try:
            self._unlink(parent, name)
        except Exception as e:
            return _errno_of(e, "unlink", (parent, name))
        return 0

    def open_now(self, ino: int, flags: int, pid: int) -> int:
        try:
            return self._open(ino, flags, pid)
        except Exception as e:
            return -_errno_of(e, "open", (ino, flags))

    def create_now(self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int, umask: int,
                   pid: int):
        try:
            fh, a = self._create(parent, name, mode, umask, flags, uid, gid, pid)
        except Exception as e:
            return -_errno_of(e, "create", (parent, name))
        return fh, self.stat_tuple(a)

    def tmpfile_now(self, parent: int, mode: int, flags: int, uid: int, gid: int, umask: int, pid: int):
        """open(dir, O_TMPFILE): a file in no directory, open; the kernel counts the entry as a lookup."""
        try:
            a = self.vol.tmpfile(parent, mode, uid, gid, umask)
            fh = self._new_handle(a.ino, flags, pid)
            self.vol.looked_up(a.ino)
        except Exception as e:
            return -_errno_of(e, "tmpfile", (parent, mode))
        return fh, self.stat_tuple(a)

    def release_now(self, fh: int) -> int:
        try:
            self._release(fh)
        except Exception as e:
            return _errno_of(e, "release", (fh,))
        return 0

    def lseek_now(self, fh: int, off: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE for extops (set_lseek_handler): the new offset, or -errno (ENXIO when no
        data or hole follows, as lseek(2) says)."""
        try:
            return self.vol.seek(self.handle(fh).ino, off, whence)
        except Exception as e:
            return -_errno_of(e, "lseek", (fh, off, whence))

    def forget_now(self, inode_list) -> None:
        for ino, nlookup in inode_list:
            try:
                self.vol.forget(ino, nlookup)
            except Exception:      # forget must not raise: it answers no request
                log.exception("internal error in forget(%d, %d)", ino, nlookup)

    async def _let_forgets_in(self) -> None:
        """A removed inode the kernel still knows is freed when its FORGET arrives, which the kernel may queue
        behind a few requests. Right after a removal, before answering with space figures (statfs) or with
        ENOSPC, give those forgets a moment (another pyfuse3 task reads them while this one sleeps). This
        awaits only before or between core calls, never inside one."""
        stop = min(self._removed_at + FORGET_WINDOW, time.monotonic() + FORGET_WAIT)
        while time.monotonic() < stop and self.vol.unlinked_unforgotten():
            await trio.sleep(0.001)

    async def commit(self) -> None:
        """Commit, with the slow parts in threads: the data file's fdatasync, and after the COMMIT, the
        WAL's fdatasync (everything goes on meanwhile; see Volume.commit). The data is synced twice: first
        with every request going on, writes too, which takes most of the data to the disk; then with
        writes waiting, so that what the COMMIT refers to is on the disk and the loop's own sync in
        Volume.commit has nothing left to do. Writes wait only for that second sync, of what they wrote
        during the first."""
        async with self._commit_lock:
            if self.vol.dirty:
                await trio.to_thread.run_sync(self.vol.sync_data)
                if self.vol.data.unsynced:
                    self._syncing = trio.Event()
                    try:
                        await trio.to_thread.run_sync(self.vol.sync_data)
                    finally:
                        done, self._syncing = self._syncing, None
                        done.set()
            barrier = self.vol.commit(wait=False)      # or the last commit's, if it is not durable yet
        if barrier is not None:
            await trio.to_thread.run_sync(self.vol.data.wait_for, barrier)

    async def _write_room(self) -> None:
        """Before a write: wait, without holding up other requests, for a commit's sync to finish and for
        room in the data file's write queue."""
        while self._syncing is not None:
            await self._syncing.wait()
        if not self.vol.data.room():
            await trio.to_thread.run_sync(self.vol.data.wait_room)

    def _new_handle(self, ino: int, flags: int, pid: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(ino, flags, pid)
        self.vol.opened(ino)
        return fh

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def _file_info(self, fh: int) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=fh, direct_io=self.direct_io, keep_cache=False, nonseekable=False)

    # -- namespace -----------------------------------------------------------------------------
    @_translate
    async def lookup(self, parent_inode, name, ctx=None):
        return self._ref(self.vol.lookup(parent_inode, name))

    @_translate
    async def getattr(self, inode, ctx=None):
        return self.entry(self.vol.getattr(inode))

    @_translate
    async def setattr(self, inode, attr, fields, fh, ctx):
        kw = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_atime:
            kw["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime_ns"] = attr.st_mtime_ns
        if fields.update_ctime:
            kw["ctime_ns"] = attr.st_ctime_ns
        return self.entry(self.vol.setattr(inode, **kw))

    @_translate
    async def readlink(self, inode, ctx):
        return self.vol.readlink(inode)

    @_translate
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._ref(self.vol.mknod(parent_inode, name, mode, ctx.uid, ctx.gid, rdev, umask=ctx.umask))

    @_translate
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._ref(self.vol.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid, umask=ctx.umask))

    @_translate
    async def unlink(self, parent_inode, name, ctx):
        self._unlink(parent_inode, name)

    def _unlink(self, parent: int, name: bytes) -> None:
        self._removed_at = time.monotonic()
        self.vol.unlink(parent, name)

    @_translate
    async def rmdir(self, parent_inode, name, ctx):
        self._removed_at = time.monotonic()
        self.vol.rmdir(parent_inode, name)

    @_translate
    async def symlink(self, parent_inode, name, target, ctx):
        return self._ref(self.vol.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_translate
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._removed_at = time.monotonic()
        self.vol.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_translate
    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._ref(self.vol.link(inode, new_parent_inode, new_name))

    @_translate
    async def opendir(self, inode, ctx):
        return self._opendir(inode)

    def _opendir(self, ino: int) -> int:
        self.vol.getattr(ino)
        self.vol.opened(ino)       # a removed directory that is still open keeps its inode (fstat works)
        return ino

    @_translate
    async def readdir(self, fh, start_id, token):
        for name, a, next_id in self._listing(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self.entry(a), next_id):
                return
            if name not in (b".", b".."):   # the kernel makes no dentry for these, so no lookup either
                self.vol.looked_up(a.ino)    # readdirplus: the kernel counts this entry as a lookup

    def readdir_now(self, fh: int, start_id: int, size: int):
        """readdir for extops (set_dir_handlers): the entries from start_id on, as many as may fit in size
        bytes; extops counts the lookups of those it replies."""
        n = size // DIRENTPLUS_MIN + 1
        try:
            return [(name, self.stat_tuple(a), next_id)
                    for name, a, next_id in itertools.islice(self._listing(fh, start_id, batch=n), n)]
        except Exception as e:
            return _errno_of(e, "readdir", (fh, start_id))

    def _listing(self, fh: int, start_id: int, batch: int = 1000):
        """(name, Attr, next offset) of ".", "..", then the entries in id order, from start_id on. The
        offset after "." is 1, after ".." 2, after an entry its id + 2 (ids start at 1), so a listing
        resumes where it stopped while entries change."""
        if start_id < 1:
            yield b".", self.vol.getattr(fh), 1
        if start_id < 2:
            yield b"..", self.vol.lookup(fh, b".."), 2
        after = max(0, start_id - 2)
        while True:
            rows = self.vol.readdir(fh, after, limit=batch)
            if not rows:
                return
            for dirent_id, name, a in rows:
                yield name, a, dirent_id + 2
            after = rows[-1][0]

    def opendir_now(self, ino: int) -> int:
        try:
            return self._opendir(ino)
        except Exception as e:
            return -_errno_of(e, "opendir", (ino,))

    def releasedir_now(self, fh: int) -> int:
        try:
            self.vol.released(fh)
        except Exception as e:
            return _errno_of(e, "releasedir", (fh,))
        return 0

    @_translate
    async def releasedir(self, fh):
        self.vol.released(fh)

    @_translate
    async def fsyncdir(self, fh, datasync):
        await self.commit()

    @_translate
    async def statfs(self, ctx):
        await self._let_forgets_in()
        s = self.vol.statfs()
        st = pyfuse3.StatvfsData()
        st.f_bsize = s["block_size"]
        st.f_frsize = s["block_size"]
        st.f_blocks = s["blocks"]
        st.f_bfree = s["blocks_free"]
        st.f_bavail = s["blocks_avail"]
        st.f_files = s["files"]
        st.f_ffree = s["files_free"]
        st.f_favail = s["files_free"]
        st.f_namemax = s["namemax"]
        return st

    # -- extended attributes -------------------------------------------------------------------
    @_translate
    async def getxattr(self, inode, name, ctx):
        if name.startswith(VIRTUAL):
            return self._virtual_xattr(inode, name)
        return self.vol.getxattr(inode, name)

    @_translate
    async def setxattr(self, inode, name, value, ctx):
        if name == XATTR_CLONE:
            await self._clone_from(inode, value, ctx)
        elif name.startswith(VIRTUAL):
            raise FsError(errno.EPERM, "reflinkfs attributes are read-only")
        elif name.startswith(b"system.") and not (self.enable_acl and name in acl.NAMES):
            # POSIX ACLs only when the kernel enforces them (enable_acl, see mount.py): stored as plain
            # bytes they would report success while nothing changes (cp -a sets modes through an ACL)
            raise FsError(errno.EOPNOTSUPP, "system.* attributes are not supported")
        else:
            self.vol.setxattr(inode, name, value)       # an ACL is checked, and sets the mode (core/acl.py)

    @_translate
    async def listxattr(self, inode, ctx):
        return self.vol.listxattr(inode)

    @_translate
    async def removexattr(self, inode, name, ctx):
        if name.startswith(VIRTUAL):
            raise FsError(errno.EPERM, "reflinkfs attributes are read-only")
        if name.startswith(b"system.") and not (self.enable_acl and name in acl.NAMES):
            raise FsError(errno.EOPNOTSUPP, "system.* attributes are not supported")
        self.vol.removexattr(inode, name)

    def _virtual_xattr(self, inode: int, name: bytes) -> bytes:
        if name == XATTR_STATUS and inode == pyfuse3.ROOT_INODE:
            st = {"cache": self.vol.io.stats(), "data_file": vars(self.vol.data.stats()),
                  "usage": self.vol.usage(), "commits": self.vol.commits,
                  "open_handles": len(self._handles), **self.status()}
            return json.dumps(st).encode()
        if name == XATTR_EXTENTS or name.startswith(XATTR_EXTENTS + b"."):
            suffix = name[len(XATTR_EXTENTS) + 1:]
            if suffix and not suffix.isdigit():
                raise FsError(errno.ENODATA)
            page = int(suffix or 0)
            a = self.vol.getattr(inode)
            if not stat.S_ISREG(a.mode):
                raise FsError(errno.ENODATA)
            pieces = self.vol.extent_map(inode)
            shared = sum(n for _, _, n, rc in pieces if rc > 1) * 4096
            mapped = sum(n for _, _, n, _ in pieces) * 4096
            chunk = pieces[page * EXTENTS_PAGE:(page + 1) * EXTENTS_PAGE]
            more = (page + 1) * EXTENTS_PAGE < len(pieces)
            return json.dumps({"size": a.size, "block_size": 4096, "count": len(pieces),
                               "shared_bytes": shared, "exclusive_bytes": mapped - shared,
                               "extents": [list(p) for p in chunk],
                               "next": f"{XATTR_EXTENTS.decode()}.{page + 1}" if more else None}).encode()
        raise FsError(errno.ENODATA)

    async def _clone_from(self, dst: int, value: bytes, ctx) -> None:
        """`reflinkfs clone`: make dst share all of src's extents, or fail; never copy bytes.

        The caller proves it may read the source by holding it open for reading (the kernel checked
        the permission at open); the kernel checks write permission on dst for setting the attribute.

        The kernel knows nothing of this change, so the daemon tells it, as it does itself around a
        copy_file_range: dirty pages of a shared mapping of either file are written back first (so the
        clone has them, and none lands on dst after it), and dst's cached pages and attributes are
        dropped after."""
        try:
            src = int(value)
        except ValueError:
            raise FsError(errno.EINVAL, "clone-from takes an inode number") from None
        if not any(h.ino == src and h.readable and h.pid == ctx.pid for h in self._handles.values()):
            raise FsError(errno.EBADF, "the source must be open for reading by the calling process")
        await self._drop_kernel_cache(src)
        await self._drop_kernel_cache(dst)
        self.vol.clone_file(src, dst)        # no await between the checks inside it and the change
        await self._drop_kernel_cache(dst)

    async def _drop_kernel_cache(self, ino: int) -> None:
        """Have the kernel write back the inode's dirty mapped pages and drop its cached pages and
        attributes. In a thread: the write-back comes to this daemon as WRITE requests, which the loop
        serves meanwhile."""
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
        except OSError as e:
            if e.errno != errno.ENOENT:       # ENOENT: the kernel has no such inode cached
                raise

    async def access(self, inode, mode, ctx):
        return True   # default_permissions: the kernel checks

    # -- files ---------------------------------------------------------------------------------
    @_translate
    async def open(self, inode, flags, ctx):
        return self._file_info(self._open(inode, flags, ctx.pid))

    def _open(self, ino: int, flags: int, pid: int) -> int:
        a = self.vol.getattr(ino)
        if stat.S_ISDIR(a.mode):
            raise FsError(errno.EISDIR)
        if flags & os.O_TRUNC and stat.S_ISREG(a.mode):
            # libfuse 3 turns on atomic_o_trunc: the kernel passes O_TRUNC here instead of a setattr
            self.vol.setattr(ino, size=0)
        return self._new_handle(ino, flags, pid)

    @_translate
    async def create(self, parent_inode, name, mode, flags, ctx):
        fh, a = self._create(parent_inode, name, mode, ctx.umask, flags, ctx.uid, ctx.gid, ctx.pid)
        return self._file_info(fh), self.entry(a)

    def _create(self, parent: int, name: bytes, mode: int, umask: int, flags: int, uid: int, gid: int,
                pid: int) -> tuple[int, Attr]:
        """Create and open a file; the kernel counts the entry it gets as a lookup (see _ref). The core
        applies the umask, or the directory's default ACL instead."""
        a = self.vol.create(parent, name, mode, uid, gid, umask=umask)
        fh = self._new_handle(a.ino, flags, pid)
        self.vol.looked_up(a.ino)
        return fh, a

    @_translate
    async def read(self, fh, off, size):
        return self.vol.read(self.handle(fh).ino, off, size)

    def read_parts(self, fh: int, off: int, size: int):
        """The read handler the mount registers with extops (see extops.set_read_handler): the same read,
        answered synchronously with the cache's buffers as an iovec, or with an errno."""
        try:
            return self.vol.read_parts(self.handle(fh).ino, off, size)
        except Exception as e:
            return _errno_of(e, "read", (fh, off, size))

    def write_now(self, fh: int, off: int, data) -> int | None:
        """The write handler the mount registers with extops (see extops.set_write_handler): the same write
        as `write`, done right here, answered with the count or -errno; or None when it has to wait (a
        commit's sync, a full write queue, ENOSPC just after a removal), which `write` then does."""
        if self._syncing is not None or not self.vol.data.room():
            return None
        try:
            return self._write_at(self.handle(fh), off, data, stable=True)   # extops' data never changes
        except FsError as e:
            if self._forget_may_free(e):
                return None
            return -_errno_of(e, "write", (fh, off))
        except Exception as e:
            return -_errno_of(e, "write", (fh, off))

    @_translate
    async def write(self, fh, off, buf):
        await self._write_room()
        h = self.handle(fh)
        try:
            return self._write_at(h, off, buf)
        except FsError as e:
            if not self._forget_may_free(e):
                raise
        await self._let_forgets_in()
        return self._write_at(h, off, buf)

    def _write_at(self, h: Handle, off: int, data, stable: bool = False) -> int:
        """Write at off. For a handle opened with O_APPEND the kernel has already put off at the end of
        the file (under the inode lock, so appends do not interleave). The daemon must not move it: the
        kernel also writes a shared mapping's dirty pages back through any writable handle of the inode,
        an O_APPEND one included, at the pages' own offsets."""
        return self.vol.write(h.ino, off, data, stable)

    def _forget_may_free(self, e: FsError) -> bool:
        """ENOSPC right after a removal: space the removal released may be a forget away."""
        return e.errno == errno.ENOSPC and time.monotonic() <= self._removed_at + FORGET_WINDOW

    async def flush(self, fh):
        pass          # nothing to do at close (so mount.py has the kernel stop sending FLUSH)

    @_translate
    async def release(self, fh):
        self._release(fh)

    def _release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            self.vol.released(h.ino)

    @_translate
    async def fsync(self, fh, datasync):
        self.handle(fh)
        await self.commit()

    async def forget(self, inode_list):
        self.forget_now(inode_list)
