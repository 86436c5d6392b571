"""A do-nothing pyfuse3 filesystem: the ceiling that `scripts/bench.py` measures reflinkfs against.

    python scripts/nullfs.py MOUNTPOINT [--debug]

Runs in the foreground until unmounted (`fusermount3 -u MOUNTPOINT`) or sent SIGINT/SIGTERM/SIGHUP.

Why it exists: reflinkfs runs on pyfuse3 + trio + libfuse, and every request crosses /dev/fuse twice and
the Python interpreter once. Whatever that stack costs, reflinkfs cannot beat it. This filesystem pays
exactly that cost and nothing else, so "reflinkfs / nullfs" is how close reflinkfs is to the best any
filesystem on this stack can do, on the same machine in the same run.

What it does, and what it deliberately does not:
- Reads return bytes of one preallocated constant buffer (a memoryview slice, never a copy), clipped to
  the file's size. By default the slice always starts at the buffer's start, so it stays in the CPU's
  caches; `--spread-mib N` serves offset `off % N MiB` of an N MiB buffer instead, so that big reads
  stream from memory the way a daemon serving a real cache must (the memory-bandwidth share of the
  ceiling). Writes are accepted and discarded; only the file size is tracked.
- A small in-memory namespace (dict per directory) with lookup, getattr, setattr, create, mknod, mkdir,
  open, read, write, unlink, rmdir, rename, readdir, statfs, release: enough for the benchmark's
  workloads (dd, cp, tar, Python create/stat/unlink loops).
- Mounted like reflinkfs: `direct_io` on every open (so every read reaches the daemon), the same
  entry/attribute timeouts (1 s) and mount options (default_permissions), no writeback cache.
- copy_file_range is not registered (plain pyfuse3 cannot), so `cp` makes the kernel copy the bytes with
  reads and writes through this filesystem. That is reported as is.
No persistence, no permissions beyond what the kernel checks, no xattrs, no hard links, no symlinks.
"""
from __future__ import annotations

import argparse
import errno
import itertools
import logging
import os
import signal
import stat
import sys
import time

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
ENTRY_TIMEOUT = 1.0      # the same as reflinkfs.fuse.adapter
ATTR_TIMEOUT = 1.0
CONST_BYTES = 4 << 20    # grown on demand if the kernel ever asks for more in one read

log = logging.getLogger("nullfs")


class Node:
    __slots__ = ("ino", "mode", "nlink", "uid", "gid", "size", "atime_ns", "mtime_ns", "ctime_ns",
                 "children", "parent")

    def __init__(self, ino: int, mode: int, uid: int, gid: int, parent: int):
        now = time.time_ns()
        self.ino = ino
        self.mode = mode
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.uid = uid
        self.gid = gid
        self.size = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = now
        self.children: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.parent = parent


class NullFS(pyfuse3.Operations):
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, spread: int = 0):
        super().__init__()
        self.spread = spread
        self.nodes: dict[int, Node] = {ROOT: Node(ROOT, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), ROOT)}
        self._next_ino = itertools.count(ROOT + 1)
        self._const = memoryview(bytes(range(256)) * ((CONST_BYTES + spread) // 256))

    # -- helpers -------------------------------------------------------------------------------
    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _dir(self, ino: int) -> Node:
        n = self._node(ino)
        if n.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return n

    @staticmethod
    def _entry(n: Node) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = n.ino
        e.generation = 0
        e.entry_timeout = ENTRY_TIMEOUT
        e.attr_timeout = ATTR_TIMEOUT
        e.st_mode = n.mode
        e.st_nlink = n.nlink
        e.st_uid = n.uid
        e.st_gid = n.gid
        e.st_rdev = 0
        e.st_size = n.size
        e.st_blksize = 4096
        e.st_blocks = (n.size + 511) // 512
        e.st_atime_ns = n.atime_ns
        e.st_mtime_ns = n.mtime_ns
        e.st_ctime_ns = n.ctime_ns
        return e

    def _new(self, parent: int, name: bytes, mode: int, ctx) -> Node:
        p = self._dir(parent)
        if name in p.children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        n = Node(next(self._next_ino), mode, ctx.uid, ctx.gid, parent)
        self.nodes[n.ino] = n
        p.children[name] = n.ino
        if n.children is not None:
            p.nlink += 1
        p.mtime_ns = p.ctime_ns = n.ctime_ns
        return n

    @staticmethod
    def _file_info(fh: int) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=False)

    # -- namespace -----------------------------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx=None):
        p = self._dir(parent_inode)
        if name == b".":
            return self._entry(p)
        if name == b"..":
            return self._entry(self._node(p.parent))
        ino = p.children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(self.nodes[ino])

    async def getattr(self, inode, ctx=None):
        return self._entry(self._node(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        n = self._node(inode)
        now = time.time_ns()
        if fields.update_size:
            n.size = attr.st_size
            n.mtime_ns = now
        if fields.update_mode:
            n.mode = stat.S_IFMT(n.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            n.uid = attr.st_uid
        if fields.update_gid:
            n.gid = attr.st_gid
        if fields.update_atime:
            n.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            n.mtime_ns = attr.st_mtime_ns
        n.ctime_ns = attr.st_ctime_ns if fields.update_ctime else now
        return self._entry(n)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._entry(self._new(parent_inode, name, mode, ctx))

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._entry(self._new(parent_inode, name, stat.S_IFDIR | (mode & ~ctx.umask & 0o7777), ctx))

    async def unlink(self, parent_inode, name, ctx):
        p = self._dir(parent_inode)
        ino = p.children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if self.nodes[ino].children is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        del p.children[name]
        del self.nodes[ino]        # no hard links, and open files need nothing but their size
        p.mtime_ns = p.ctime_ns = time.time_ns()

    async def rmdir(self, parent_inode, name, ctx):
        p = self._dir(parent_inode)
        ino = p.children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        d = self._dir(ino)
        if d.children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del p.children[name]
        del self.nodes[ino]
        p.nlink -= 1
        p.mtime_ns = p.ctime_ns = time.time_ns()

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        po, pn = self._dir(parent_inode_old), self._dir(parent_inode_new)
        ino = po.children.get(name_old)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        old = pn.children.get(name_new)
        if old is not None:
            if self.nodes[old].children:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            del self.nodes[old]
        del po.children[name_old]
        pn.children[name_new] = ino
        n = self.nodes[ino]
        if n.children is not None and po is not pn:
            po.nlink -= 1
            pn.nlink += 1
        n.parent = parent_inode_new

    async def opendir(self, inode, ctx):
        self._dir(inode)
        return inode

    async def readdir(self, fh, start_id, token):
        d = self._dir(fh)
        # the id of an entry is its position + 1; entries never move while a listing is in progress here
        for i, (name, ino) in enumerate(itertools.islice(d.children.items(), start_id, None), start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._entry(self.nodes[ino]), i):
                return

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = st.f_bfree = st.f_bavail = 1 << 30
        st.f_files = len(self.nodes) + (1 << 20)
        st.f_ffree = st.f_favail = 1 << 20
        st.f_namemax = 255
        return st

    # -- files ---------------------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        n = self._node(inode)
        if n.children is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:
            n.size = 0
        return self._file_info(inode)

    async def create(self, parent_inode, name, mode, flags, ctx):
        n = self._new(parent_inode, name, stat.S_IFREG | (mode & ~ctx.umask & 0o7777), ctx)
        return self._file_info(n.ino), self._entry(n)

    async def read(self, fh, off, size):
        n = self.nodes.get(fh)
        if n is None:
            return b""                 # unlinked while open: nothing worth keeping
        count = min(size, n.size - off)
        if count <= 0:
            return b""
        start = off % self.spread if self.spread else 0
        if start + count > len(self._const):
            self._const = memoryview(bytes(range(256)) * (-(-(start + count) // 256)))
        return self._const[start:start + count]

    async def write(self, fh, off, buf):
        n = self.nodes.get(fh)
        if n is not None and off + len(buf) > n.size:
            n.size = off + len(buf)
        return len(buf)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass

    async def fsync(self, fh, datasync):
        pass

    async def fsyncdir(self, fh, datasync):
        pass

    async def forget(self, inode_list):
        pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nullfs", description="A do-nothing pyfuse3 filesystem (benchmark ceiling).")
    p.add_argument("mountpoint")
    p.add_argument("--debug", action="store_true", help="log every FUSE request (libfuse debug)")
    p.add_argument("--spread-mib", type=int, default=0,
                   help="serve reads from offset (off mod N MiB) of an N MiB buffer instead of its start")
    return p.parse_args(argv)


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        async def on_signal():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return
        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s nullfs %(levelname)s: %(message)s")
    if not os.path.isdir(args.mountpoint):
        print(f"nullfs: {args.mountpoint}: not a directory", file=sys.stderr)
        return 1
    options = set(pyfuse3.default_options) | {"fsname=nullfs", "subtype=nullfs"}
    if args.debug:
        options.add("debug")
    pyfuse3.init(NullFS(spread=args.spread_mib << 20), args.mountpoint, options)
    print(f"nullfs mounted on {args.mountpoint}", file=sys.stderr, flush=True)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
