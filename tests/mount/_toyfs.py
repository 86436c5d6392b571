"""A tiny in-memory filesystem served by reflinkfs.fuse.extops, for test_extops.py (run as a script).

    python _toyfs.py MOUNTPOINT LOGFILE MODE

It answers through the request layer exactly as the real mount does (extops.serve with an operations
object, pyfuse3 running the loop), with behaviour chosen by file name so that one mount shows each way
a method can answer: a value now, an exception, a coroutine (answered later), a value that cannot be
replied, or a request dropped unanswered.

The root holds "src" (SRC_DATA), "dst" (empty), "deny" and "drop" (4096 bytes each); MODE "dirs" adds
n000..n399. "deny" answers EPERM where it can, "drop" fails in other ways:
- read: "src" is answered as a list of 100-byte views; "deny" raises EPERM; "drop" raises ValueError.
- write: "deny" raises EPERM, "drop" raises ValueError; writes at offsets from 1 MiB to 8 MiB are
  deferred (a coroutine that yields to trio first); from 8 MiB on the data object is kept, and its
  SHA-256 is logged again at exit.
- lookup: "bad" returns a malformed value; "slow" is deferred, then ENOENT.
- unlink: "deny" raises EPERM, "drop" raises ValueError.
- create: "eperm" raises EPERM, "badc" returns a malformed value, "later" is deferred.
- fallocate: deferred; on "drop" the coroutine drops its Request unanswered (spawn keeps it from
  replying), which the layer must answer EIO.
- copy_file_range: copies in memory; with a nonzero flags argument it raises EINVAL.
- lseek: SEEK_DATA answers the offset itself, SEEK_HOLE the size; "deny" raises ENXIO, "drop" returns
  a malformed value.
- statfs: always deferred.
- mknod is not served (ENOSYS).
MODE "nochain" turns chains off (extops.set_chain_wait(0)).

Every method call is appended to LOGFILE as a JSON line.
"""

import errno
import hashlib
import json
import os
import stat
import sys
import time

# Must happen before the first `import pyfuse3` in this process.
from reflinkfs.fuse import extops

STATUS = extops.load()

import pyfuse3  # noqa: E402
import trio  # noqa: E402

ROOT = 1
SRC_DATA = bytes(range(256)) * 64  # 16 KiB, known to the test
ATIME_NS = -1_500_000_001          # the times getattr answers with
MTIME_NS = 1_234_567_891_234_567_891
DEFER_FROM, KEEP_FROM = 1 << 20, 8 << 20


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1)

    def __call__(self, **rec):
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()


def err(e):
    return OSError(e, os.strerror(e))


class ToyOps:
    def __init__(self, log):
        self.log = log
        self.names = {b"src": 2, b"dst": 3, b"deny": 4, b"drop": 5}
        self.data = {2: bytearray(SRC_DATA), 3: bytearray(), 4: bytearray(b"x" * 4096),
                     5: bytearray(b"x" * 4096)}
        self.next_ino = 6
        self.fhs = {}            # file handle -> inode
        self.next_fh = 100
        self.kept = []           # (offset, sha256 when written, data) of the writes kept
        self.nursery = None
        self.dropped = []        # Requests spawn kept from replying

    # the layer's hooks
    def errno_of(self, op, exc):
        self.log(event="errno_of", op=op, exc=repr(exc))
        return exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO

    def spawn(self, coro, request):
        self.log(event="spawn", op=request.op)
        self.nursery.start_soon(self._answer, coro, request)

    async def _answer(self, coro, request):
        try:
            value = await coro
        except Exception as e:
            request.fail(e)
            return
        if value == "drop":
            self.log(event="dropped", op=request.op)
            return                         # never answered: the layer answers EIO when it is freed
        request.reply(value)
        try:
            request.reply(value)
        except RuntimeError:
            self.log(event="second_reply_refused", op=request.op)

    def looked_up(self, ino):
        self.log(event="looked_up", ino=ino)

    def attr(self, ino):
        if ino == ROOT:
            mode, nlink, size = stat.S_IFDIR | 0o755, 2, 0
        elif ino in self.data:
            mode, nlink, size = stat.S_IFREG | 0o644, 1, len(self.data[ino])
        else:
            raise err(errno.ENOENT)
        return (ino, mode, nlink, os.getuid(), os.getgid(), 0, size, 4096, (size + 511) // 512,
                ATIME_NS, MTIME_NS, time.time_ns())

    # namespace
    def lookup(self, parent, name):
        self.log(event="lookup", name=name.decode())
        if name == b"bad":
            return ("not", "attributes")
        if name == b"slow":
            return self._slow_enoent()
        if parent != ROOT or name not in self.names:
            raise err(errno.ENOENT)
        return self.attr(self.names[name])

    async def _slow_enoent(self):
        await trio.sleep(0.01)
        raise err(errno.ENOENT)

    def getattr(self, ino):
        return self.attr(ino)

    def setattr(self, ino, to_set, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns):
        self.log(event="setattr", ino=ino, to_set=to_set, size=size)
        if to_set & 8:
            d = self.data[ino]
            del d[size:]
            d.extend(bytes(size - len(d)))
        return self.attr(ino)

    def unlink(self, parent, name):
        self.log(event="unlink", name=name.decode())
        if name == b"deny":
            raise err(errno.EPERM)
        if name == b"drop":
            raise ValueError("unlink failure (expected by the test)")
        ino = self.names.pop(name, None)
        if ino is None:
            raise err(errno.ENOENT)
        del self.data[ino]

    def forget(self, inodes):
        self.log(event="forget", inodes=inodes)

    # files
    def _handle(self, ino):
        fh = self.next_fh
        self.next_fh += 1
        self.fhs[fh] = ino
        return fh

    def open(self, ino, flags, pid):
        self.log(event="open", ino=ino, flags=flags, pid=pid)
        if ino not in self.data:
            raise err(errno.ENOENT)
        return self._handle(ino)

    def create(self, parent, name, mode, flags, uid, gid, umask, pid):
        self.log(event="create", name=name.decode(), mode=mode, flags=flags, uid=uid, gid=gid, umask=umask,
                 pid=pid)
        if name == b"eperm":
            raise err(errno.EPERM)
        if name == b"badc":
            return ("not", "a handle")
        ino = self.names[name] = self.next_ino
        self.next_ino += 1
        self.data[ino] = bytearray()
        if name == b"later":
            return self._later((self._handle(ino), self.attr(ino)))
        return self._handle(ino), self.attr(ino)

    async def _later(self, value):
        await trio.sleep(0)
        return value

    def release(self, fh):
        self.log(event="release", fh=fh)
        self.fhs.pop(fh)

    def read(self, fh, off, size):
        ino = self.fhs[fh]
        if ino == self.names.get(b"deny"):
            raise err(errno.EPERM)
        if ino == self.names.get(b"drop"):
            raise ValueError("read failure (expected by the test)")
        view = memoryview(bytes(self.data[ino][off:off + size]))
        return [view[i:i + 100] for i in range(0, len(view), 100)]

    def write(self, fh, off, data):
        ino = self.fhs[fh]
        self.log(event="write", ino=ino, off=off, size=len(data), type=type(data).__name__)
        if ino == self.names.get(b"deny"):
            raise err(errno.EPERM)
        if ino == self.names.get(b"drop"):
            raise ValueError("write failure (expected by the test)")
        if off >= KEEP_FROM:
            self.kept.append((off, hashlib.sha256(data).hexdigest(), data))
            return len(data)
        if off >= DEFER_FROM:
            return self._write_later(ino, off, data)
        return self._store(ino, off, data)

    def _store(self, ino, off, data):
        d = self.data[ino]
        if len(d) < off:
            d.extend(bytes(off - len(d)))
        d[off:off + len(data)] = data
        return len(data)

    async def _write_later(self, ino, off, data):
        await trio.sleep(0)
        self.log(event="write_later", off=off, size=len(data), sha=hashlib.sha256(data).hexdigest())
        return self._store(ino, off, data)

    def fallocate(self, fh, mode, off, length):
        ino = self.fhs[fh]
        self.log(event="fallocate", ino=ino, mode=mode, off=off, length=length)
        return self._fallocate(ino, off + length)

    async def _fallocate(self, ino, end):
        await trio.sleep(0)
        if ino == self.names.get(b"drop"):
            return "drop"
        d = self.data[ino]
        d.extend(bytes(max(0, end - len(d))))
        return None

    def copy_file_range(self, fh_in, off_in, fh_out, off_out, length, flags):
        self.log(event="copy_file_range", fh_in=fh_in, off_in=off_in, fh_out=fh_out, off_out=off_out,
                 length=length, flags=flags)
        chunk = bytes(self.data[self.fhs[fh_in]][off_in:off_in + length])
        return self._store(self.fhs[fh_out], off_out, chunk)

    def lseek(self, fh, off, whence):
        ino = self.fhs[fh]
        self.log(event="lseek", ino=ino, off=off, whence=whence)
        if ino == self.names.get(b"deny"):
            raise err(errno.ENXIO)
        if ino == self.names.get(b"drop"):
            return "not an offset"
        return off if whence == os.SEEK_DATA else len(self.data[ino])

    # directories
    def opendir(self, ino):
        self.log(event="opendir", ino=ino)
        if ino != ROOT:
            raise err(errno.ENOTDIR)
        return 7

    def readdirplus(self, fh, off, size):
        self.log(event="readdirplus", fh=fh, off=off, size=size)
        entries = [(b".", ROOT), (b"..", ROOT)] + sorted(self.names.items())
        return [(name, self.attr(ino), i + 1) for i, (name, ino) in enumerate(entries)
                if i >= off][:size // 160 + 1]

    def releasedir(self, fh):
        self.log(event="releasedir", fh=fh)

    def statfs(self, ino):
        return self._later((4096, 4096, 1 << 20, 1 << 19, 1 << 19, 1 << 16, 1 << 15, 1 << 15, 255))


async def amain(ops, log):
    async with trio.open_nursery() as nursery:
        ops.nursery = nursery
        log(event="mounted", interposed=extops.interposed(), negotiated=extops.negotiated())
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main():
    mountpoint, logfile, mode = sys.argv[1:4]
    log = Log(logfile)
    ops = ToyOps(log)
    if mode == "dirs":
        for i in range(400):
            ino = ops.names[b"n%03d" % i] = ops.next_ino
            ops.next_ino += 1
            ops.data[ino] = bytearray(b"x" * i)
    elif mode == "nochain":
        extops.set_chain_wait(0)
    elif mode != "normal":
        raise SystemExit(f"unknown mode {mode!r}")
    extops.serve(ops, ops.spawn, direct_io=True, entry_timeout=0, attr_timeout=0)
    opts = set(pyfuse3.default_options)
    opts.add("fsname=reflinkfs-toy")
    pyfuse3.init(pyfuse3.Operations(), mountpoint, opts)
    try:
        trio.run(amain, ops, log)
    finally:
        pyfuse3.close(unmount=False)
    log(event="kept", writes=[(off, sha, hashlib.sha256(d).hexdigest(), type(d).__name__, len(d))
                              for off, sha, d in ops.kept])
    exc = extops.last_exception()
    log(event="exit", counts=extops.counts(), last_exception=repr(exc) if exc is not None else None)


if __name__ == "__main__":
    main()
