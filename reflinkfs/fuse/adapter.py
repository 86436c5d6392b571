"""The FUSE adapter: every FUSE request, once, as a call on the core; errors become errno here.

The request layer (`extops`, see its docstring) calls the method named after each request
synchronously, in trio's thread, and replies what it returns. So a method runs the core call to
completion with no `await` in between: requests never interleave inside the core, and the only state
here is the table of open file handles. A method fails by raising; `errno_of` is the one place that
turns an exception into the errno the kernel gets (and logs what the operator must see). A method that
has to wait returns a coroutine instead (fsync: a commit; a write: a commit's sync or room in the write
queue; statfs right after a removal: the kernel's FORGETs; a clone: the kernel writing back mapped
pages), which the layer runs as a task and answers when it ends; such a coroutine awaits only before
or between core calls, never inside one.

Lookup counts: every entry handed to the kernel (lookup, create, tmpfile, mknod, mkdir, symlink, link,
readdirplus) is counted by the core until the kernel's FORGET, and an unlinked inode is freed only when
neither an open handle nor the kernel refers to it any more, as FUSE requires.

Passthrough (fuse/passthrough.py decides, this module asks and waits): a read-only open of a whole file
may be answered `(fh, backing_id)`, so the kernel reads the segment's file itself; a change of an inode
held open that way (a write open, truncate, clone into it) waits for those opens to be released, at most
passthrough.WRITE_WAIT seconds, then fails with ETXTBSY.

An exception that is not an `FsError` is a bug: it is logged with its traceback and answered with EIO.
"""
from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import stat
import time
from typing import Callable

import trio

from .. import xattrs
from ..core import acl, du
from ..core.treeclone import Cred, TreeClone, TreeProgress
from ..core.volume import Attr, Volume
from ..errors import FsError
from .passthrough import WAIT, WRITE_WAIT, Passthrough

log = logging.getLogger("reflinkfs.fuse")

ROOT_INODE = 1
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0
FORGET_WINDOW = 1.0     # seconds after a removal during which statfs/ENOSPC wait for the kernel's forgets
FORGET_WAIT = 0.05      # ... and for at most this long
DIRENTPLUS_MIN = 160    # bytes a readdirplus entry takes at least (its entry and dirent headers, a name)

# setattr's to_set bits (libfuse's FUSE_SET_ATTR_*)
SET_MODE, SET_UID, SET_GID, SET_SIZE, SET_ATIME, SET_MTIME = 1, 2, 4, 8, 16, 32
SET_ATIME_NOW, SET_MTIME_NOW, SET_CTIME = 128, 256, 1024

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# Virtual extended attributes: how tools and the `reflinkfs` commands see inside a mount (names and rules
# in reflinkfs/xattrs.py).
VIRTUAL = xattrs.PREFIX.encode()
XATTR_EXTENTS = xattrs.EXTENTS.encode()
XATTR_STATUS = xattrs.STATUS.encode()
XATTR_CLONE = xattrs.CLONE_FROM.encode()
XATTR_DU = xattrs.DU.encode()                  # du.<ino>.<ino>...: those trees and their union (core/du.py)
XATTR_CLONE_TREE = xattrs.CLONE_TREE.encode()  # set on DST's parent to b"<src inode>\0<token>\0<name>"
                                               # (clone -r); on the root, ...clone-tree.<token> reads its progress
TREE_RESULTS = 64                              # finished tree clones whose outcome stays readable
TREE_COMMIT_AFTER = 0.25                       # seconds of tree-clone steps between two commits
EXTENTS_PAGE = 1500                            # keeps a page under the kernel's 64 KiB xattr limit


def stat_tuple(a: Attr) -> tuple:
    """The attributes the kernel gets (the shape extops replies)."""
    return (a.ino, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.size, 4096, a.blocks * 8,
            a.atime_ns, a.mtime_ns, a.ctime_ns)


def writes(flags: int) -> bool:
    """Whether an open with these flags may change the file (O_TRUNC truncates even a read-only open)."""
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


class Handle:
    __slots__ = ("ino", "readable", "write", "pid", "seg")

    def __init__(self, ino: int, flags: int, pid: int, seg: int | None = None):
        self.ino = ino
        self.readable = (flags & os.O_ACCMODE) in (os.O_RDONLY, os.O_RDWR)
        self.write = writes(flags)
        self.pid = pid
        self.seg = seg          # passthrough to this segment's file; None: the daemon path


class Operations:
    def __init__(self, volume: Volume, status: Callable[[], dict] | None = None, acl_enabled=lambda: True,
                 invalidate=None, passthrough: Passthrough | None = None):
        self.vol = volume
        self.pt = passthrough                     # None: every open on the daemon path
        self.status: Callable[[], dict] = status or dict   # extra statistics from the composition root
        self.acl_enabled = acl_enabled            # () -> the kernel enforces POSIX ACLs (INIT agreed)
        self.invalidate = invalidate              # invalidate(ino): drop the kernel's pages of ino (a thread)
        self.nursery: trio.Nursery | None = None  # where deferred requests run (mount.py sets it)
        self.clones = 0
        self.cloned_bytes = 0
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._removed_at = -FORGET_WINDOW      # monotonic time of the last unlink/rmdir/rename
        self._commit_lock = trio.Lock()
        self._syncing: trio.Event | None = None   # set while a commit syncs the data file in a thread
        self._tree_lock = trio.Lock()             # one tree clone at a time (its tables are the volume's)
        # token -> a tree clone's outcome, or while it runs a function reporting its progress
        self._tree_clones: dict[bytes, dict | Callable[[], dict]] = {}
        self._tree_active: TreeProgress | None = None   # the running tree clone's progress
        # looked_up(ino): an entry a READDIRPLUS reply carried, which the kernel counts as a lookup; the
        # request layer calls it once per entry, so it is the volume's own method, not a wrapper of it
        self.looked_up: Callable[[int], None] = volume.looked_up
        self._pt_released = trio.Event()          # set (and replaced) when an inode's last passthrough open goes

    # -- the layer's hooks ---------------------------------------------------------------------
    @staticmethod
    def errno_of(op: str, exc: BaseException) -> int:
        """The errno a failed operation answers with; what the operator must see is logged here."""
        if isinstance(exc, FsError):
            if exc.errno == errno.EIO:
                log.error("%s: %s", op, exc.message)
            return exc.errno or errno.EIO
        if isinstance(exc, OSError):
            log.error("%s: %s", op, exc)
            return exc.errno or errno.EIO
        if isinstance(exc, trio.Cancelled):
            return errno.EINTR          # the mount is going away
        log.error("internal error in %s", op, exc_info=exc)
        return errno.EIO

    def spawn(self, coro, request) -> None:
        """Run a deferred request's coroutine in the mount's nursery and answer with what it gives."""
        assert self.nursery is not None, "deferred requests come only while the mount's nursery runs"
        self.nursery.start_soon(self._answer, coro, request, name=f"fuse {request.op}")

    @staticmethod
    async def _answer(coro, request) -> None:
        try:
            value = await coro
        except BaseException as e:
            request.fail(e)
            if not isinstance(e, Exception):
                raise
        else:
            request.reply(value)

    # -- namespace -----------------------------------------------------------------------------
    def _entry(self, a: Attr) -> tuple:
        """An entry for the kernel, which counts it as a lookup until it sends forget (see Volume.looked_up)."""
        self.vol.looked_up(a.ino)
        return stat_tuple(a)

    def lookup(self, parent: int, name: bytes) -> tuple:
        return self._entry(self.vol.lookup(parent, name))

    def forget(self, inodes) -> None:
        for ino, nlookup in inodes:
            try:
                self.vol.forget(ino, nlookup)
            except Exception:      # one bad forget must not stop the others: it answers no request
                log.exception("internal error in forget(%d, %d)", ino, nlookup)

    def getattr(self, ino: int) -> tuple:
        return stat_tuple(self.vol.getattr(ino))

    def setattr(self, ino: int, to_set: int, mode: int, uid: int, gid: int, size: int, atime_ns: int,
                mtime_ns: int, ctime_ns: int):
        kw = {}
        if to_set & SET_MODE:
            kw["mode"] = mode
        if to_set & SET_UID:
            kw["uid"] = uid
        if to_set & SET_GID:
            kw["gid"] = gid
        if to_set & SET_SIZE:
            kw["size"] = size
        now = time.time_ns()
        if to_set & (SET_ATIME | SET_ATIME_NOW):
            kw["atime_ns"] = now if to_set & SET_ATIME_NOW else atime_ns
        if to_set & (SET_MTIME | SET_MTIME_NOW):
            kw["mtime_ns"] = now if to_set & SET_MTIME_NOW else mtime_ns
        if to_set & SET_CTIME:
            kw["ctime_ns"] = ctime_ns
        if "size" in kw and self._held(ino):
            return self._setattr_later(ino, kw)
        return stat_tuple(self.vol.setattr(ino, **kw))

    async def _setattr_later(self, ino: int, kw: dict) -> tuple:
        await self._until_unheld(ino)
        return stat_tuple(self.vol.setattr(ino, **kw))

    def readlink(self, ino: int) -> bytes:
        return self.vol.readlink(ino)

    # New inodes: the kernel sends modes unmasked with the umask beside them (FUSE_CAP_DONT_MASK), and
    # the core applies the umask, or the directory's default ACL instead.
    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int, umask: int) -> tuple:
        return self._entry(self.vol.mknod(parent, name, mode, uid, gid, rdev, umask=umask))

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int, umask: int) -> tuple:
        return self._entry(self.vol.mkdir(parent, name, mode, uid, gid, umask=umask))

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> tuple:
        return self._entry(self.vol.symlink(parent, name, target, uid, gid))

    def link(self, ino: int, new_parent: int, new_name: bytes) -> tuple:
        return self._entry(self.vol.link(ino, new_parent, new_name))

    def unlink(self, parent: int, name: bytes) -> None:
        self._removed_at = time.monotonic()
        self.vol.unlink(parent, name)

    def rmdir(self, parent: int, name: bytes) -> None:
        self._removed_at = time.monotonic()
        self.vol.rmdir(parent, name)

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int) -> None:
        self._removed_at = time.monotonic()
        self.vol.rename(parent, name, new_parent, new_name, flags)

    # -- directories ---------------------------------------------------------------------------
    def opendir(self, ino: int) -> int:
        self.vol.getattr(ino)
        self.vol.opened(ino)       # a removed directory that is still open keeps its inode (fstat works)
        return ino

    def readdirplus(self, fh: int, start_id: int, size: int) -> list:
        """The entries from start_id on, as many as may fit in size bytes; extops replies those that fit
        and counts them as lookups (looked_up)."""
        n = size // DIRENTPLUS_MIN + 1
        return [(name, stat_tuple(a), next_id)
                for name, a, next_id in itertools.islice(self._listing(fh, start_id, batch=n), n)]

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

    def releasedir(self, fh: int) -> None:
        self.vol.released(fh)

    def fsyncdir(self, fh: int, datasync: int):
        return self.commit()

    def statfs(self, ino: int):
        if self._forgets_pending():
            return self._statfs_later()
        return self._statfs()

    async def _statfs_later(self) -> tuple:
        await self._let_forgets_in()
        return self._statfs()

    def _statfs(self) -> tuple:
        s = self.vol.statfs()
        return (s["block_size"], s["block_size"], s["blocks"], s["blocks_free"], s["blocks_avail"],
                s["files"], s["files_free"], s["files_free"], s["namemax"])

    # -- extended attributes -------------------------------------------------------------------
    def getxattr(self, ino: int, name: bytes) -> bytes:
        if name.startswith(VIRTUAL):
            return self._virtual_xattr(ino, name)
        return self.vol.getxattr(ino, name)

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int, pid: int):
        if name == XATTR_CLONE:
            return self._clone_from(ino, value, pid)
        if name == XATTR_CLONE_TREE:
            return self._clone_tree(ino, value, pid)
        self._check_settable(name)
        if flags & (os.XATTR_CREATE | os.XATTR_REPLACE):
            try:
                self.vol.getxattr(ino, name)
                exists = True
            except FsError as e:
                if e.errno != errno.ENODATA:
                    raise
                exists = False
            if flags & os.XATTR_CREATE and exists:
                raise FsError(errno.EEXIST)
            if flags & os.XATTR_REPLACE and not exists:
                raise FsError(errno.ENODATA)
        self.vol.setxattr(ino, name, value)       # an ACL is checked, and sets the mode (core/acl.py)
        return None

    def listxattr(self, ino: int) -> bytes:
        return b"".join(n + b"\0" for n in self.vol.listxattr(ino))

    def removexattr(self, ino: int, name: bytes) -> None:
        self._check_settable(name)
        self.vol.removexattr(ino, name)

    def _check_settable(self, name: bytes) -> None:
        if name.startswith(VIRTUAL):
            raise FsError(errno.EPERM, "reflinkfs attributes are read-only")
        if name.startswith(b"system.") and not (name in acl.NAMES and self.acl_enabled()):
            # POSIX ACLs only when the kernel enforces them: stored as plain bytes they would report
            # success while nothing changes (cp -a sets modes through an ACL)
            raise FsError(errno.EOPNOTSUPP, "system.* attributes are not supported")

    def _virtual_xattr(self, inode: int, name: bytes) -> bytes:
        if name == XATTR_STATUS and inode == ROOT_INODE:
            st = {"cache": self.vol.io.stats(), "data_file": vars(self.vol.data.stats()),
                  "usage": self.vol.usage(), "commits": self.vol.commits,
                  "open_handles": len(self._handles), "clones": self.clones,
                  "cloned_bytes": self.cloned_bytes,
                  "tree_clone_entries_done": self._tree_active.entries_done if self._tree_active else 0,
                  "passthrough": self.pt.stats() if self.pt else {"mode": "off", "active": False},
                  **self.status()}
            return json.dumps(st).encode()
        if name.startswith(XATTR_CLONE_TREE + b".") and inode == ROOT_INODE:
            info = self._tree_clones.get(name[len(XATTR_CLONE_TREE) + 1:])
            if info is None:
                raise FsError(errno.ENODATA)
            return json.dumps(info() if callable(info) else info).encode()
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
            w = self.vol.wholeness(inode)
            return json.dumps({"size": a.size, "block_size": 4096, "count": len(pieces),
                               "segment": w.segment, "whole": w.whole, "not_whole_because": w.why,
                               "shared_bytes": shared, "exclusive_bytes": mapped - shared,
                               "extents": [list(p) for p in chunk],
                               "next": f"{XATTR_EXTENTS.decode()}.{page + 1}" if more else None}).encode()
        if name == XATTR_DU or name.startswith(XATTR_DU + b"."):
            return self._du(inode, name[len(XATTR_DU) + 1:])
        raise FsError(errno.ENODATA)

    def _du(self, inode: int, more: bytes) -> bytes:
        """`reflinkfs du`: one request for a set of trees, answered from the database (core/du.py)."""
        try:
            roots = [inode] + [int(x) for x in more.split(b".") if x] if more else [inode]
        except ValueError:
            raise FsError(errno.ENODATA) from None
        for ino in roots:
            self.vol.getattr(ino)              # ENOENT for an inode that does not exist
        return json.dumps(du.usage(self.vol.db, roots)).encode()

    async def _clone_from(self, dst: int, value: bytes, pid: int) -> None:
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
        if not any(h.ino == src and h.readable and h.pid == pid for h in self._handles.values()):
            raise FsError(errno.EBADF, "the source must be open for reading by the calling process")
        await self._drop_kernel_cache(src)
        await self._drop_kernel_cache(dst)
        await self._until_unheld(dst)
        self.vol.clone_file(src, dst)        # no await between the checks (here and inside it) and the change
        await self._drop_kernel_cache(dst)

    def _clone_tree(self, parent: int, value: bytes, pid: int) -> None:
        """`reflinkfs clone -r`: clone directory SRC as (parent, name) in one request (core/treeclone.py).

        The caller's credentials (from /proc, as FUSE gives setxattr only the pid) decide what it may
        clone, checked as `cp -r` would be; the kernel has checked write permission on parent. The
        request is answered once the clone is started, not when it ends: the kernel holds parent's
        inode lock until a setxattr is answered, which would stop every lookup, listing and create in
        parent for the whole clone. The tree is built in batches, each one operation, with the loop
        serving other requests between them; the new name appears at once at the end. Its progress and
        outcome (phase "done" or "failed", with the error) are read from the root's
        ...clone-tree.<token> attribute, which the command polls."""
        try:
            src_s, token, name = value.split(b"\0", 2)
            src = int(src_s)
        except ValueError:
            raise FsError(errno.EINVAL, "clone-tree takes b'<inode>\\0<token>\\0<name>'") from None
        if not token or len(token) > 64:
            raise FsError(errno.EINVAL, "bad clone-tree token")
        cred = Cred.of_pid(pid)
        outcome: dict = {"phase": "waiting", "entries_total": 0, "entries_done": 0, "bytes_shared": 0}
        self._tree_clones[token] = outcome
        while len(self._tree_clones) > TREE_RESULTS:
            del self._tree_clones[next(iter(self._tree_clones))]
        assert self.nursery is not None, "requests come only while the mount's nursery runs"
        self.nursery.start_soon(self._run_tree_clone, parent, src, name, token, cred, outcome,
                                name="tree clone")

    async def _run_tree_clone(self, parent: int, src: int, name: bytes, token: bytes, cred, outcome: dict):
        """The clone `_clone_tree` started; every outcome, failure included, goes to outcome's entry."""
        started = time.monotonic()
        longest = 0.0
        try:
            async with self._tree_lock:
                # files held open may have dirty mapped pages: have the kernel write them back first, so
                # the clone sees what a reader sees (each a thread call; the loop serves the writes)
                for ino in {h.ino for h in self._handles.values()}:
                    await self._drop_kernel_cache(ino)
                tc = TreeClone(self.vol, src, parent, name, cred)
                progress = tc.progress

                def report() -> dict:
                    return {"phase": progress.phase, "entries_total": progress.entries_total,
                            "entries_done": progress.entries_done, "bytes_shared": progress.bytes_shared,
                            "seconds": time.monotonic() - started, "longest_step_ms": longest * 1000}
                self._tree_clones[token] = report
                self._tree_active = progress
                try:
                    work = 0.0                 # seconds of steps since the last commit
                    while True:                # one batch, one core operation; other requests in between
                        t = time.monotonic()
                        more = tc.step()
                        took = time.monotonic() - t
                        longest = max(longest, took)
                        work += took
                        if not more:
                            break
                        if work >= TREE_COMMIT_AFTER:
                            # COMMIT writes the transaction's pages to the WAL in this thread: after
                            # seconds of clone work, that is a stall of the whole mount; commit as the
                            # work goes, so each COMMIT is short (the staging tree is consistent)
                            work = 0.0
                            await self.commit(durable=False)
                        await trio.sleep(0)
                except BaseException:
                    tc.abort()
                    raise
                finally:
                    self._tree_active = None
                t = time.monotonic()
                tc.publish()
                longest = max(longest, time.monotonic() - t)
                log.info("tree clone: %d entries in %.2f s, longest step %.1f ms", progress.entries_done,
                         time.monotonic() - started, longest * 1000)
                self.clones += 1
                self.cloned_bytes += progress.bytes_shared
                final = report()
                self._tree_clones[token] = dict(final, phase="settling")   # "done" once the kernel knows
        except FsError as e:
            outcome.update(phase="failed", error=e.message, errno=e.errno,
                           path=os.fsdecode(getattr(e, "path", b"") or b"") or None)
            self._tree_clones[token] = outcome
            return
        except Exception as e:  # noqa: BLE001 - a bug fails this clone (logged), not the mount
            log.exception("tree clone failed")
            outcome.update(phase="failed", error=f"internal error: {e}", errno=errno.EIO, path=None)
            self._tree_clones[token] = outcome
            return
        # The kernel cached parent's attributes (nlink, mtime); it caches no negative entry for name (a
        # failed lookup is answered with an error, not an entry).
        await self._drop_kernel_cache(parent)
        self._tree_clones[token] = final

    async def _drop_kernel_cache(self, ino: int) -> None:
        """Have the kernel write back the inode's dirty mapped pages and drop its cached pages and
        attributes. In a thread: the write-back comes to this daemon as WRITE requests, which the loop
        serves meanwhile."""
        if self.invalidate is None:
            return
        try:
            await trio.to_thread.run_sync(self.invalidate, ino)
        except OSError as e:
            if e.errno != errno.ENOENT:       # ENOENT: the kernel has no such inode cached
                raise

    # -- files ---------------------------------------------------------------------------------
    def _new_handle(self, ino: int, flags: int, pid: int, seg: int | None = None) -> int:
        fh = self._next_fh
        self._next_fh += 1
        h = self._handles[fh] = Handle(ino, flags, pid, seg)
        self.vol.opened(ino)
        if self.pt is not None:
            self.pt.opened(ino, h.write, seg)
        return fh

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def open(self, ino: int, flags: int, pid: int):
        """A handle on the daemon path, or (handle, backing id) in passthrough (see fuse/passthrough.py);
        later when a change must wait for passthrough opens, or a passthrough open for the data file's writer."""
        a = self.vol.getattr(ino)
        if stat.S_ISDIR(a.mode):
            raise FsError(errno.EISDIR)
        if self.pt is None or not stat.S_ISREG(a.mode):
            return self._open_daemon(ino, flags, pid)
        if writes(flags):
            if self._held(ino):
                return self._open_when_unheld(ino, flags, pid)
            return self._open_daemon(ino, flags, pid)
        return self._open_read(ino, flags, pid, after_wait=False)

    def _open_daemon(self, ino: int, flags: int, pid: int) -> int:
        if flags & os.O_TRUNC and stat.S_ISREG(self.vol.getattr(ino).mode):
            # libfuse 3 turns on atomic_o_trunc: the kernel passes O_TRUNC here instead of a setattr
            self.vol.setattr(ino, size=0)
        return self._new_handle(ino, flags, pid)

    def _open_read(self, ino: int, flags: int, pid: int, after_wait: bool):
        assert self.pt is not None
        backing_id, seg = self.pt.choose(ino, self.vol.wholeness, self.vol.data.queued_in, after_wait)
        if (backing_id, seg) == WAIT:
            return self._open_when_written(ino, flags, pid)
        if not backing_id:
            return self._new_handle(ino, flags, pid)
        assert seg is not None
        try:
            return self._new_handle(ino, flags, pid, seg), backing_id
        except BaseException:
            self.pt.unused(seg)                 # a registration made for this open alone is closed again
            raise

    async def _open_when_written(self, ino: int, flags: int, pid: int):
        """The file is whole but writes of it are still queued: once they are in the segment's file, decide
        again (the loop serves other requests meanwhile, so anything may have changed)."""
        barrier = self.vol.data.barrier(lambda: None)
        await trio.to_thread.run_sync(self.vol.data.wait_for, barrier)
        self.vol.getattr(ino)
        return self._open_read(ino, flags, pid, after_wait=True)

    async def _open_when_unheld(self, ino: int, flags: int, pid: int) -> int:
        await self._until_unheld(ino)
        return self._open_daemon(ino, flags, pid)    # no await since the check: no passthrough open now

    def _held(self, ino: int) -> bool:
        return self.pt is not None and self.pt.held(ino)

    async def _until_unheld(self, ino: int) -> None:
        """Wait until ino has no passthrough open (a change must not reach a file the kernel reads from a
        segment), at most WRITE_WAIT seconds: then ETXTBSY. Returns with no await after its last check."""
        if not self._held(ino):
            return
        assert self.pt is not None
        self.pt.write_waits += 1
        with trio.move_on_after(WRITE_WAIT):
            while self.pt.held(ino):
                await self._pt_released.wait()
        if self.pt.held(ino):
            self.pt.busy += 1
            raise FsError(errno.ETXTBSY, "the file is open for reading in passthrough")

    def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int, umask: int,
               pid: int) -> tuple:
        """Create and open a file; the kernel counts the entry it gets as a lookup."""
        a = self.vol.create(parent, name, mode, uid, gid, umask=umask)
        return self._new_handle(a.ino, flags, pid), self._entry(a)

    def tmpfile(self, parent: int, mode: int, flags: int, uid: int, gid: int, umask: int, pid: int) -> tuple:
        """open(dir, O_TMPFILE): a file in no directory, open; the kernel counts the entry as a lookup."""
        a = self.vol.tmpfile(parent, mode, uid, gid, umask)
        return self._new_handle(a.ino, flags, pid), self._entry(a)

    def read(self, fh: int, off: int, size: int):
        """The cache's buffers, replied as one iovec."""
        return self.vol.read_parts(self.handle(fh).ino, off, size)

    def write(self, fh: int, off: int, data):
        """Write at off, now, or later when it has to wait (a commit's sync, a full write queue, ENOSPC
        just after a removal). For a handle opened with O_APPEND the kernel has already put off at the
        end of the file (under the inode lock, so appends do not interleave); the daemon must not move
        it: the kernel also writes a shared mapping's dirty pages back through a mapped O_APPEND handle,
        at the pages' own offsets. The data never changes (bytes, or extops' WriteData)."""
        if self._syncing is not None or not self.vol.data.room():
            return self._write_later(fh, off, data)
        ino = self.handle(fh).ino
        try:
            return self.vol.write(ino, off, data, True)
        except FsError as e:
            if not self._forget_may_free(e):
                raise
        return self._write_later(fh, off, data)

    async def _write_later(self, fh: int, off: int, data) -> int:
        await self._write_room()
        ino = self.handle(fh).ino
        try:
            return self.vol.write(ino, off, data, True)
        except FsError as e:
            if not self._forget_may_free(e):
                raise
        await self._let_forgets_in()
        return self.vol.write(self.handle(fh).ino, off, data, True)

    def lseek(self, fh: int, off: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE from the extent map (ENXIO when no data or hole follows, as lseek(2) says)."""
        return self.vol.seek(self.handle(fh).ino, off, whence)

    def release(self, fh: int) -> None:
        h = self._handles.pop(fh, None)
        if h is not None:
            if self.pt is not None and self.pt.released(h.ino, h.write, h.seg):
                self._pt_released.set()          # wake the changes waiting for this inode
                self._pt_released = trio.Event()
            self.vol.released(h.ino)

    def fsync(self, fh: int, datasync: int):
        self.handle(fh)
        return self.commit()

    # copy_file_range becomes Volume.clone_range: whole blocks are shared, never copied. The kernel has
    # already done what copy_file_range(2) documents before asking: it rejects overlapping ranges of one
    # file, directories, files opened without the right modes and O_APPEND destinations, and returns 0
    # for a source offset at or past EOF; the core checks the same again because `reflinkfs clone`
    # reaches it too.
    def copy_file_range(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int,
                        flags: int) -> int:
        if flags:
            raise FsError(errno.EINVAL)
        src, dst = self.handle(fh_in), self.handle(fh_out)
        done = self.vol.clone_range(src.ino, off_in, dst.ino, off_out, length)
        self.clones += 1
        self.cloned_bytes += done
        return done

    def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        ino = self.handle(fh).ino
        keep = bool(mode & FALLOC_FL_KEEP_SIZE)
        if mode & FALLOC_FL_PUNCH_HOLE:
            if mode != FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
                raise FsError(errno.EOPNOTSUPP)
            self.vol.punch_hole(ino, off, length)
        elif mode & FALLOC_FL_ZERO_RANGE:
            if mode & ~(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):
                raise FsError(errno.EOPNOTSUPP)
            self.vol.zero_range(ino, off, length, keep_size=keep)
        elif mode & ~FALLOC_FL_KEEP_SIZE:
            raise FsError(errno.EOPNOTSUPP)
        else:
            self.vol.allocate(ino, off, length, keep_size=keep)

    # -- waiting -------------------------------------------------------------------------------
    def _forgets_pending(self) -> bool:
        return time.monotonic() < self._removed_at + FORGET_WINDOW and bool(self.vol.unlinked_unforgotten())

    async def _let_forgets_in(self) -> None:
        """A removed inode the kernel still knows is freed when its FORGET arrives, which the kernel may queue
        behind a few requests. Right after a removal, before answering with space figures (statfs) or with
        ENOSPC, give those forgets a moment (the loop serves them while this task sleeps)."""
        stop = min(self._removed_at + FORGET_WINDOW, time.monotonic() + FORGET_WAIT)
        while time.monotonic() < stop and self.vol.unlinked_unforgotten():
            await trio.sleep(0.001)

    def _forget_may_free(self, e: FsError) -> bool:
        """ENOSPC right after a removal: space the removal released may be a forget away."""
        return e.errno == errno.ENOSPC and time.monotonic() <= self._removed_at + FORGET_WINDOW

    async def _write_room(self) -> None:
        """Before a write: wait, without holding up other requests, for a commit's sync to finish and for
        room in the data file's write queue."""
        while self._syncing is not None:
            await self._syncing.wait()
        if not self.vol.data.room():
            await trio.to_thread.run_sync(self.vol.data.wait_room)

    async def commit(self, durable: bool = True) -> None:
        """Commit, with the slow parts in threads: the data file's fdatasync, and after the COMMIT, the
        WAL's fdatasync (everything goes on meanwhile; see Volume.commit); with durable=False, return
        without waiting for that last sync (the commit becomes durable all the same, in order). The data is synced twice: first
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
        if barrier is not None and durable:
            await trio.to_thread.run_sync(self.vol.data.wait_for, barrier)
