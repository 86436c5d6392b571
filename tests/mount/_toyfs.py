"""Tiny in-memory pyfuse3 filesystem used by test_extops.py (run as a script).

    python _toyfs.py MOUNTPOINT LOGFILE MODE

MODE "normal": copy_file_range is an async handler that copies in memory and
replies with req.reply_write(n); fallocate is a plain handler that replies
0, except on the file "drop" where it drops the Request without replying
(the extension must then answer EIO).
MODE "raise": both handlers record the call and raise.
MODE "readv": reads go to a handler registered with extops.set_read_handler:
"src" is answered as a list of 100-byte views, "dst" with the errno EPERM, and
on "drop" the handler raises (the extension must then answer EIO). Files are
opened with direct_io, so every read reaches the handler.
MODE "readv-nochain": the same with read chains turned off (set_chain_wait(0)).
MODE "writev": writes go to a handler registered with extops.set_write_handler
(files opened with direct_io): "src" is written there, "dst" answers -EPERM,
writes at offsets from 1 MiB to 8 MiB are passed on (None) to pyfuse3's own
write handler, writes from 8 MiB on are kept: the handler holds on to the data
object it was given, and logs its SHA-256 again at exit; and on "drop" the
handler raises (the write must fail with EIO).
MODE "meta": lookup, getattr, unlink and forget go to handlers registered with
extops.set_meta_handlers (timeouts 0, so every stat reaches them), which answer
with fixed atime/mtime; "pass" is passed on to pyfuse3's lookup, the getattr of
"dst" to pyfuse3's getattr; lookup of "bad" returns a malformed result, unlink
of "dst" answers EPERM and of "drop" raises.
MODE "files": open, create and release go to handlers registered with
extops.set_file_handlers (no_flush=True: the first FLUSH is answered ENOSYS,
and no FLUSH may reach pyfuse3's flush after it). open_now hands out file
handles from 100 on; the open of "dst" is passed on to pyfuse3's open, whose
handle (the inode) release_now passes on to pyfuse3's release too; the open
of "drop" raises. create_now makes the file, except "eperm" (-EPERM), "bad"
(a malformed result) and "passc" (passed on to pyfuse3's create).
MODE "dirs": 400 more files (n000..n399), and opendir, readdirplus and
releasedir go to handlers registered with extops.set_dir_handlers: opendir_now
answers fh 7 for the root, readdir_now returns ".", ".." and the names from the
offset on, as many as may fit, and looked_up logs every entry extops counts.
MODE "lseek": SEEK_DATA and SEEK_HOLE go to a handler registered with
extops.set_lseek_handler: on "src" SEEK_DATA answers off + 1 and SEEK_HOLE the
size, and from offset 8192 on it passes the request on (None: pyfuse3 has no
lseek, so ENOSYS, and the kernel answers itself from then on); "dst" answers
-ENXIO; on "drop" SEEK_DATA raises and SEEK_HOLE returns a malformed result
(both must fail with EIO).

Every handler call and every write is appended to LOGFILE as a JSON line.
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

ROOT = pyfuse3.ROOT_INODE
SRC_DATA = bytes(range(256)) * 64  # 16 KiB, known to the test
META_ATIME_NS = -1_500_000_001     # "meta": the times the synchronous handlers answer with
META_MTIME_NS = 1_234_567_891_234_567_891
KEEP_FROM = 8 << 20                # "writev": write_now keeps the data of writes from here on


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1)

    def __call__(self, **rec):
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()


class ToyFS(pyfuse3.Operations):
    def __init__(self, log):
        super().__init__()
        self.log = log
        self.names = {b"src": 2, b"dst": 3, b"drop": 4}
        self.kept = []           # (offset, sha256 when written, data) of the writes write_now kept
        self.data = {2: bytearray(SRC_DATA), 3: bytearray(), 4: bytearray()}
        self.next_ino = 5
        self.direct_io = False
        self.fhs = {}            # "files": the handles open_now/create_now gave out -> inode

    def attr(self, ino):
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        now = time.time_ns()
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = now
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        a.entry_timeout = a.attr_timeout = 0
        a.st_blksize = 4096
        if ino == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        elif ino in self.data:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
            a.st_size = len(self.data[ino])
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_blocks = (a.st_size + 511) // 512
        return a

    async def lookup(self, parent, name, ctx=None):
        self.log(event="lookup", name=name.decode())
        if parent != ROOT or name not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attr(self.names[name])

    async def getattr(self, ino, ctx=None):
        self.log(event="getattr", ino=ino)
        return self.attr(ino)

    async def unlink(self, parent, name, ctx):
        self.log(event="unlink", name=name.decode())

    # "meta" mode: the handlers extops calls synchronously
    def stat_tuple(self, ino):
        a = self.attr(ino)
        return (ino, a.st_mode, a.st_nlink, a.st_uid, a.st_gid, 0, a.st_size, 4096, a.st_blocks,
                META_ATIME_NS, META_MTIME_NS, a.st_ctime_ns)

    def lookup_now(self, parent, name):
        self.log(event="lookup_now", name=name.decode())
        if name == b"pass":
            return None
        if name == b"bad":
            return ("not", "attributes")
        if parent != ROOT or name not in self.names:
            return errno.ENOENT
        return self.stat_tuple(self.names[name])

    def getattr_now(self, ino):
        self.log(event="getattr_now", ino=ino)
        if ino == 3:                # dst: pyfuse3's getattr
            return None
        if ino != ROOT and ino not in self.data:
            return errno.ENOENT
        return self.stat_tuple(ino)

    def unlink_now(self, parent, name):
        self.log(event="unlink_now", name=name.decode())
        if name == b"dst":
            return errno.EPERM
        if name == b"drop":
            raise ValueError("unlink handler failure (expected by the test)")
        ino = self.names.pop(name, None)
        if ino is None:
            return errno.ENOENT
        del self.data[ino]
        return 0

    def forget_now(self, inodes):
        self.log(event="forget_now", inodes=inodes)

    # "files" mode: open, create and release, synchronously
    def _handle(self, ino):
        fh = 100 + len(self.fhs)
        self.fhs[fh] = ino
        return fh

    def open_now(self, ino, flags, pid):
        self.log(event="open_now", ino=ino, flags=flags, pid=pid)
        if ino == 3:
            return None
        if ino == 4:
            raise ValueError("open handler failure (expected by the test)")
        if ino not in self.data:
            return -errno.ENOENT
        return self._handle(ino)

    def create_now(self, parent, name, mode, flags, uid, gid, umask, pid):
        self.log(event="create_now", name=name.decode(), mode=mode, flags=flags, uid=uid, gid=gid,
                 umask=umask, pid=pid)
        if name == b"eperm":
            return -errno.EPERM
        if name == b"bad":
            return ("not", "a handle")
        if name == b"passc":
            return None
        ino = self.names[name] = self.next_ino
        self.next_ino += 1
        self.data[ino] = bytearray()
        return self._handle(ino), self.stat_tuple(ino)

    # "dirs" mode: opendir, readdirplus and releasedir, synchronously
    def opendir_now(self, ino):
        self.log(event="opendir_now", ino=ino)
        return 7 if ino == ROOT else -errno.ENOTDIR

    def readdir_now(self, fh, off, size):
        self.log(event="readdir_now", fh=fh, off=off, size=size)
        entries = [(b".", ROOT), (b"..", ROOT)] + sorted(self.names.items())
        return [(name, self.stat_tuple(ino), i + 1) for i, (name, ino) in enumerate(entries)
                if i >= off][:size // 160 + 1]

    def releasedir_now(self, fh):
        self.log(event="releasedir_now", fh=fh)
        return 0

    def looked_up(self, ino):
        self.log(event="looked_up", ino=ino)

    def release_now(self, fh):
        self.log(event="release_now", fh=fh)
        return None if fh < 100 else 0

    async def setattr(self, ino, attr, fields, fh, ctx):
        if fields.update_size:
            d = self.data[ino]
            if attr.st_size < len(d):
                del d[attr.st_size:]
            else:
                d.extend(bytes(attr.st_size - len(d)))
        return self.attr(ino)

    async def open(self, ino, flags, ctx):
        self.log(event="open", ino=ino)
        if ino not in self.data:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return pyfuse3.FileInfo(fh=ino, direct_io=self.direct_io)

    async def create(self, parent, name, mode, flags, ctx):
        self.log(event="create", name=name.decode())
        if parent != ROOT:
            raise pyfuse3.FUSEError(errno.EACCES)
        ino = self.names.get(name)
        if ino is None:
            ino = self.names[name] = self.next_ino
            self.next_ino += 1
            self.data[ino] = bytearray()
        return pyfuse3.FileInfo(fh=ino), self.attr(ino)

    async def read(self, fh, off, size):
        return bytes(self.data[self.fhs.get(fh, fh)][off:off + size])

    async def write(self, fh, off, buf):
        fh = self.fhs.get(fh, fh)
        d = self.data[fh]
        if len(d) < off:
            d.extend(bytes(off - len(d)))
        d[off:off + len(buf)] = buf
        self.log(event="write", ino=fh, off=off, size=len(buf), sha=hashlib.sha256(buf).hexdigest())
        return len(buf)

    async def flush(self, fh):
        self.log(event="flush", fh=fh)

    async def release(self, fh):
        self.log(event="release", fh=fh)

    async def opendir(self, ino, ctx):
        if ino != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ino

    async def readdir(self, fh, start_id, token):
        entries = sorted(self.names.items())
        for i, (name, ino) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self.attr(ino), i):
                break

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 20
        s.f_files = s.f_ffree = s.f_favail = 1 << 16
        s.f_namemax = 255
        return s

    # ---- extops handlers -------------------------------------------------

    async def copy_file_range(self, req, ino_in, fh_in, off_in, ino_out, fh_out,
                              off_out, length, flags):
        rec = dict(event="copy_file_range", ino_in=ino_in, fh_in=fh_in, off_in=off_in,
                   ino_out=ino_out, fh_out=fh_out, off_out=off_out, length=length,
                   flags=flags, uid=req.uid, gid=req.gid, pid=req.pid,
                   counts=extops.counts())
        await trio.sleep(0)  # reply after a real trip through the trio scheduler
        chunk = bytes(self.data[fh_in][off_in:off_in + length])
        d = self.data[fh_out]
        if len(d) < off_out:
            d.extend(bytes(off_out - len(d)))
        d[off_out:off_out + len(chunk)] = chunk
        req.reply_write(len(chunk))
        try:
            req.reply_write(len(chunk))
        except RuntimeError:
            rec["double_reply_raised"] = True
        else:
            rec["double_reply_raised"] = False
        rec["replied"] = len(chunk)
        self.log(**rec)

    def fallocate(self, req, ino, fh, mode, offset, length):
        rec = dict(event="fallocate", ino=ino, fh=fh, mode=mode, offset=offset,
                   length=length, uid=req.uid, gid=req.gid, pid=req.pid,
                   counts=extops.counts())
        if fh == self.names[b"drop"]:
            rec["dropped"] = True
            self.log(**rec)
            return  # no reply: the Request's dealloc must answer EIO
        d = self.data[fh]
        if mode == 0 and len(d) < offset + length:
            d.extend(bytes(offset + length - len(d)))
        self.log(**rec)
        req.reply_err(0)

    def read_parts(self, fh, off, size):
        if fh == self.names[b"drop"]:
            raise ValueError("read handler failure (expected by the test)")
        if fh == self.names[b"dst"]:
            return errno.EPERM
        view = memoryview(bytes(self.data[fh][off:off + size]))
        return [view[i:i + 100] for i in range(0, len(view), 100)] or [b""]

    def write_now(self, fh, off, data):
        if fh == self.names[b"dst"]:
            return -errno.EPERM
        if fh == self.names[b"drop"]:
            raise ValueError("write handler failure (expected by the test)")
        if off >= KEEP_FROM:
            self.kept.append((off, hashlib.sha256(data).hexdigest(), data))
            self.log(event="write_now", ino=fh, off=off, size=len(data), type=type(data).__name__)
            return len(data)
        if off >= 1 << 20:
            return None
        d = self.data[fh]
        if len(d) < off:
            d.extend(bytes(off - len(d)))
        d[off:off + len(data)] = data
        self.log(event="write_now", ino=fh, off=off, size=len(data), type=type(data).__name__)
        return len(data)

    def lseek_now(self, fh, off, whence):
        self.log(event="lseek_now", fh=fh, off=off, whence=whence)
        if fh == self.names[b"drop"]:
            if whence == os.SEEK_DATA:
                raise ValueError("lseek handler failure (expected by the test)")
            return ("not", "an offset")
        if fh == self.names[b"dst"]:
            return -errno.ENXIO
        if off >= 8192:
            return None
        return off + 1 if whence == os.SEEK_DATA else len(self.data[fh])

    def raising_copy_file_range(self, req, *args):
        self.log(event="copy_file_range", raised=True, args=list(args),
                 counts=extops.counts())
        raise ValueError("handler failure (expected by the test)")

    def raising_fallocate(self, req, *args):
        self.log(event="fallocate", raised=True, args=list(args), counts=extops.counts())
        raise ValueError("handler failure (expected by the test)")


async def amain(fs, mode, log):
    log(event="mounted", interposed=extops.interposed(), mode=mode)
    await pyfuse3.main()


def main():
    mountpoint, logfile, mode = sys.argv[1:4]
    log = Log(logfile)
    log(event="start", load_effective=bool(STATUS), reason=STATUS.reason)
    fs = ToyFS(log)
    if mode == "normal":
        extops.set_handlers(copy_file_range=fs.copy_file_range, fallocate=fs.fallocate)
    elif mode == "raise":
        extops.set_handlers(copy_file_range=fs.raising_copy_file_range,
                            fallocate=fs.raising_fallocate)
    elif mode in ("readv", "readv-nochain"):
        fs.data[fs.names[b"dst"]] = bytearray(4096)       # not empty: the kernel reads only below EOF
        fs.data[fs.names[b"drop"]] = bytearray(4096)
        fs.direct_io = True
        extops.set_read_handler(fs.read_parts)
        if mode == "readv-nochain":
            extops.set_chain_wait(0)
    elif mode == "meta":
        extops.set_meta_handlers(lookup=fs.lookup_now, getattr=fs.getattr_now, unlink=fs.unlink_now,
                                 forget=fs.forget_now, entry_timeout=0, attr_timeout=0)
    elif mode == "files":
        extops.set_file_handlers(open=fs.open_now, create=fs.create_now, release=fs.release_now,
                                 direct_io=True, no_flush=True)
    elif mode == "dirs":
        for i in range(400):
            ino = fs.names[b"n%03d" % i] = fs.next_ino
            fs.next_ino += 1
            fs.data[ino] = bytearray(b"x" * i)
        extops.set_dir_handlers(opendir=fs.opendir_now, readdir=fs.readdir_now,
                                releasedir=fs.releasedir_now, looked_up=fs.looked_up)
    elif mode == "lseek":
        extops.set_lseek_handler(fs.lseek_now)
    elif mode == "writev":
        fs.direct_io = True
        extops.set_write_handler(fs.write_now)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    opts = set(pyfuse3.default_options)
    opts.add("fsname=reflinkfs-toy")
    pyfuse3.init(fs, mountpoint, opts)
    try:
        trio.run(amain, fs, mode, log)
    finally:
        pyfuse3.close(unmount=False)
    log(event="kept", writes=[(off, sha, hashlib.sha256(d).hexdigest(), type(d).__name__, len(d))
                              for off, sha, d in fs.kept])
    exc = extops.last_exception()
    log(event="exit", counts=extops.counts(), interposed=extops.interposed(),
        last_exception=repr(exc) if exc is not None else None)


if __name__ == "__main__":
    main()
