"""Passthrough: which opens the kernel serves itself, from one segment's file, and the bookkeeping that
keeps the kernel's rules.

What it buys. A *whole* file (core/segments.py: one segment holds exactly its bytes at their own
offsets) can be handed to the kernel: its reads and mappings then go to the segment's file, with no
trip through the daemon, and every clone whole on that segment shares that file's page cache. So N
clones read, mapped or executed cost one page cache, at the speed of the store's own filesystem.

The rules, decided per open (`choose`):
1. A write open (O_WRONLY, O_RDWR, O_TRUNC) never passes through: the daemon serves writes.
2. A read-only open of an inode that already has passthrough opens passes through to the *same*
   backing file. The kernel demands it (any other open of such an inode fails with EIO), and it is
   safe: while an inode is held through passthrough it cannot change (rule 5).
3. Any other read-only open passes through only when all of these hold, else it takes the daemon path
   and the reason is counted (`stats()["refusals"]`):
   - passthrough is on and the kernel agreed to it (`unavailable` says why not, once, in the log);
   - nobody else has the inode open: not for writing (readers must see the writes, which the daemon
     serves), and not for reading on the daemon path either (such a file may have a MAP_SHARED
     mapping, which puts the inode in the kernel's cached mode, after which a passthrough open fails
     with EIO; the daemon cannot see mappings, so it assumes one);
   - the file is whole (the check costs a stat and a walk of the segment's data for a file outside
     segment 0, one query otherwise);
   - no write to the segment is still queued in the data file's writer (the kernel reads the file
     itself, not through DataFile.read); the adapter waits for the writer and asks again (WAIT).
4. Backing files: one registration per segment (`extops.backing_open`), shared by every inode whole on
   it, made at the first passthrough open and closed at the release of the last. The file is opened
   through a read-only view of the segments folder: a detached clone of the folder's mount
   (open_tree(OPEN_TREE_CLONE)) made read-only and private (mount_setattr). It is in no mount table,
   nothing propagates into it, and it goes away with its last reference: the daemon's descriptor and
   the kernel's backing files, which the kernel drops when the session ends, crash or not. A write
   through a backing file cannot happen (the file is open read-only, on a read-only mount): a mistake
   is an error, never a write into a segment that clones share.
5. A change to an inode held through passthrough (a write open, truncate, clone into it) waits, up to
   WRITE_WAIT seconds, for its passthrough opens to be released, then fails with ETXTBSY, as Linux does
   for a running executable (`held` tells the adapter; it does the waiting). The wait covers the race
   with a reader's close: the kernel detaches the backing file at close but sends RELEASE later, so a
   writer that comes right after a reader's close may still see the reader counted here. Counted in
   this module at RELEASE, so never fewer than the kernel holds: when `held` is False, the kernel has
   no backing file attached to the inode, and a daemon-path open cannot fail for it.

After a file stops being whole no read returns its old bytes: it stops only through a change (rule 5),
so no passthrough open is left, and later opens are decided again (rule 3) and go the daemon path,
whose cache is coherent; a file whole again (rewritten into a segment of its own) may pass through
again. One exception the kernel gives no way around: a mapping made through passthrough outlives the
open (the mapping holds the backing file, not the FUSE file), and keeps showing the segment's bytes
after a later write of that file is put elsewhere (copy-on-write).

Threads: everything here runs in trio's thread, inside request methods (no await in between), so no
lock. The one descriptor, the view's, is opened and closed in that thread too.
"""
from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import logging
import os
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("reflinkfs.passthrough")

WRITE_WAIT = 1.0          # seconds a change of an inode held through passthrough waits, then ETXTBSY
WAIT = (-1, None)         # choose(): queued writes of the segment must reach its file first
DAEMON = (0, None)        # choose(): the daemon path

# Reasons a read-only open took the daemon path (the keys of stats()["refusals"]).
R_WRITER = "open for writing"
R_DAEMON_OPEN = "open on the daemon path"
R_NOT_WHOLE = "not whole"
R_QUEUED = "writes still queued"
R_BACKING = "backing file refused"

CAP_SYS_ADMIN = 21


def precheck(cap_sys_admin: bool, kernel_release: str) -> str:
    """Why passthrough cannot work here, as far as can be told before mounting ('' if it may): the daemon
    says the rest once INIT has told (the kernel's configuration, libfuse's version)."""
    if not cap_sys_admin:
        return "not root: the daemon lacks CAP_SYS_ADMIN, which the kernel asks of backing files"
    try:
        version = tuple(int(x) for x in kernel_release.split("-")[0].split(".")[:2])
    except ValueError:
        return ""
    if version < (6, 9):
        return f"the kernel ({kernel_release}) is too old: FUSE passthrough needs Linux >= 6.9"
    return ""


def has_cap_sys_admin() -> bool:
    """Whether this process has CAP_SYS_ADMIN in its effective set (the kernel asks it of backing files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


# -- the read-only view of the segments folder -------------------------------------------------------
_SYS_OPEN_TREE = 428            # the same number on every architecture (syscalls added since Linux 5.1)
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_AT_EMPTY_PATH = 0x1000
_MOUNT_ATTR_RDONLY = 0x1
_MS_PRIVATE = 1 << 18


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def readonly_view(folder: str) -> int:
    """A descriptor of a detached, read-only, private clone of the mount under `folder`, rooted there:
    files opened relative to it (dir_fd) cannot be written. OSError if the kernel refuses."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(-100), os.fsencode(folder),
                      ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"open_tree: {os.strerror(e)}", folder)
    attr = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY, propagation=_MS_PRIVATE)
    r = libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(fd), b"", ctypes.c_uint(_AT_EMPTY_PATH),
                     ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    if r < 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, f"mount_setattr: {os.strerror(e)}", folder)
    return fd


# -- the decisions -------------------------------------------------------------------------------------
@dataclass
class _Backing:
    backing_id: int
    users: int            # passthrough opens through it


@dataclass
class _Inode:
    daemon: int = 0       # open on the daemon path (writers included)
    writers: int = 0      # ... of them, open for writing
    passthrough: int = 0  # open in passthrough
    seg: int = 0          # the segment of the passthrough opens


class Passthrough:
    """One mount's passthrough opens. `register(fd) -> id` and `unregister(id)` are extops'
    backing_open / backing_close; `negotiated()` is extops.negotiated (None before INIT)."""

    def __init__(self, segs_folder: str, *, wanted: str, register: Callable[[int], int],
                 unregister: Callable[[int], None], negotiated: Callable[[], dict | None]):
        self.segs_folder = segs_folder
        self.mode = "auto" if wanted == "" else "off"
        self._wanted_why = wanted             # "" or why passthrough was not even asked for
        self._register = register
        self._unregister = unregister
        self._negotiated = negotiated
        self._settled = False
        self.unavailable = wanted or "not negotiated yet"
        self._view = -1
        self._inodes: dict[int, _Inode] = {}
        self._backings: dict[int, _Backing] = {}
        self.refusals: collections.Counter[str] = collections.Counter()
        self.opens_total = 0
        self.write_waits = 0                  # changes that had to wait for passthrough opens to go
        self.busy = 0                         # ... and were answered ETXTBSY
        self._logged: set[str] = set()

    # -- whether passthrough is on: settled once, after INIT -----------------------------------------
    @property
    def active(self) -> bool:
        if not self._settled:
            self._settle()
        return self.unavailable == ""

    def _settle(self) -> None:
        if self._wanted_why:
            self._settled = True
            self.unavailable = self._wanted_why
        else:
            n = self._negotiated()
            if n is None:
                return                       # before INIT: not yet known
            self._settled = True
            self.unavailable = "" if n.get("passthrough") else n.get("passthrough_unavailable") or "not agreed"
        if self.unavailable and self.mode == "auto":
            log.warning("passthrough unavailable: %s; every file is served through the daemon", self.unavailable)
        elif not self.unavailable:
            log.info("passthrough on: whole files opened read-only are read by the kernel from their segment")

    # -- opens -----------------------------------------------------------------------------------------
    def held(self, ino: int) -> bool:
        """Whether ino has passthrough opens (as far as RELEASE has told: never fewer than the kernel's)."""
        i = self._inodes.get(ino)
        return i is not None and i.passthrough > 0

    def choose(self, ino: int, wholeness, queued_in: Callable[[int], bool],
               after_wait: bool = False) -> tuple[int, int | None]:
        """For a read-only open of regular file ino: (backing id, segment) to pass through to, DAEMON for the
        daemon path, or WAIT (wait for the data file's writer, then ask again with after_wait=True).
        `wholeness(ino)` is Volume.wholeness; `queued_in(seg)` DataFile.queued_in."""
        i = self._inodes.get(ino)
        if i is not None and i.passthrough:
            return self._backings[i.seg].backing_id, i.seg    # rule 2
        if not self.active:
            return DAEMON
        if i is not None and i.writers:
            return self._refuse(R_WRITER)
        if i is not None and i.daemon:
            return self._refuse(R_DAEMON_OPEN)
        w = wholeness(ino)
        if not w.whole:
            return self._refuse(R_NOT_WHOLE)
        if queued_in(w.segment):
            return self._refuse(R_QUEUED) if after_wait else WAIT
        seg = w.segment
        assert seg is not None
        b = self._backings.get(seg)
        if b is None:
            backing_id = self._open_backing(seg)
            if not backing_id:
                return self._refuse(R_BACKING)
            b = self._backings[seg] = _Backing(backing_id, 0)
        return b.backing_id, seg

    def _refuse(self, why: str) -> tuple[int, None]:
        self.refusals[why] += 1
        return DAEMON

    def _open_backing(self, seg: int) -> int:
        try:
            if self._view < 0:
                self._view = readonly_view(self.segs_folder)
            fd = os.open(str(seg), os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._view)
            try:
                return self._register(fd)
            finally:
                os.close(fd)                 # the kernel holds its own reference
        except OSError as e:
            key = f"{e.errno}"
            if key not in self._logged:      # once per kind of failure, not per open
                self._logged.add(key)
                log.warning("passthrough: cannot register segment %d as a backing file: %s", seg,
                            e.strerror or e)
            return 0

    def opened(self, ino: int, write: bool, seg: int | None) -> None:
        """An open was answered: in passthrough to segment seg's backing file, or (seg None) on the daemon path."""
        i = self._inodes.setdefault(ino, _Inode())
        if seg is None:
            i.daemon += 1
            i.writers += write
            return
        i.passthrough += 1
        i.seg = seg
        self._backings[seg].users += 1
        self.opens_total += 1

    def unused(self, seg: int) -> None:
        """choose() gave seg's backing file to an open that then failed before opened(): close an unused registration."""
        b = self._backings.get(seg)
        if b is not None and b.users == 0:
            self._close_backing(seg)

    def released(self, ino: int, write: bool, seg: int | None) -> bool:
        """The kernel released an open (as opened() described it). True when that was ino's last passthrough
        open: a change waiting for it may go on."""
        i = self._inodes.get(ino)
        if i is None:
            return False
        last = False
        if seg is None:
            i.daemon -= 1
            i.writers -= write
        else:
            i.passthrough -= 1
            last = i.passthrough == 0
            b = self._backings[seg]
            b.users -= 1
            if b.users == 0:
                self._close_backing(seg)
        if not (i.daemon or i.passthrough):
            del self._inodes[ino]
        return last

    def _close_backing(self, seg: int) -> None:
        b = self._backings.pop(seg)
        try:
            self._unregister(b.backing_id)
        except (OSError, RuntimeError) as e:      # the session is gone: so is the registration
            if not (isinstance(e, OSError) and e.errno in (errno.ENOENT, errno.ENODEV)):
                log.warning("passthrough: closing the backing file of segment %d: %s", seg, e)

    def close(self) -> None:
        """At unmount: the registrations end with the session; the view's descriptor is closed here."""
        if self._view >= 0:
            os.close(self._view)
            self._view = -1
        self._backings.clear()

    def stats(self) -> dict:
        active = self.active
        return {"mode": self.mode, "active": active, "unavailable": self.unavailable,
                "open_now": sum(i.passthrough for i in self._inodes.values()),
                "opens": self.opens_total, "backing_files": len(self._backings),
                "refusals": dict(self.refusals), "write_waits": self.write_waits, "busy": self.busy}
