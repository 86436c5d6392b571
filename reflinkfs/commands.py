"""Commands that work on mounts: mount, umount (and, through the mount, clone, stat, df, status).

A dead mount is a reflinkfs mount whose daemon has died (kill -9, OOM, a crash): it stays in the mount
table and every access to it fails with ENOTCONN until it is detached. A daemon holds its store's lock
from before it mounts until after it has unmounted, so a reflinkfs mount whose store lock is free has
no daemon: it is dead. `mount` detaches a dead mount of the same store (while holding that store's
lock, so that two `mount` commands racing on it cannot both go on, and no live mount is ever detached)
and then mounts as usual; any other mount in the way is refused with the command that clears it.
`umount` detaches a dead mount (lazily: processes inside it keep getting ENOTCONN) and says so.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from .errors import StoreError

MOUNT_WAIT = 30.0
UMOUNT_WAIT = 120.0


def add_parsers(sub) -> None:
    from .cli import _size
    s = sub.add_parser("mount", help="mount a store (returns once the mount is ready)")
    s.add_argument("store")
    s.add_argument("mountpoint")
    s.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    s.add_argument("-d", "--debug", action="store_true", help="log every request (implies nothing else)")
    s.add_argument("-o", dest="fuse_options", action="append", default=[], metavar="OPT[,OPT...]",
                   help="FUSE mount options, e.g. allow_other; also nonempty (same as --nonempty)")
    s.add_argument("--nonempty", action="store_true",
                   help="mount even if the mountpoint is not empty (its contents are hidden until unmount)")
    s.add_argument("--cache", choices=["shared", "inode", "none"], default="shared",
                   help="shared: one cache keyed by physical extent (default); inode: a plain per-inode cache; "
                        "none: no cache")
    s.add_argument("--cache-size", type=_size, default=256 << 20, help="cache budget in bytes (default 256M)")
    s.add_argument("--kernel-cache", action="store_true",
                   help="let the kernel cache mount files too (for comparison; costs one copy per inode)")
    s.add_argument("--commit-interval", type=float, default=5.0, help="seconds between metadata commits")
    s.add_argument("--log", help="daemon log file (default: STORE/log)")

    s = sub.add_parser("umount", help="unmount, flushing everything to the store")
    s.add_argument("mountpoint")

    s = sub.add_parser("clone", help="share all extents of SRC with DST, or fail (never copies bytes)")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("-r", "--recursive", action="store_true", help="clone a directory tree")
    s.add_argument("-f", "--force", action="store_true",
                   help="replace an existing destination file (with -r: merge into an existing tree, entry by entry)")
    s.add_argument("--json", action="store_true", help="print what was cloned: entries, bytes shared, seconds")

    s = sub.add_parser("stat", help="show files' extent maps and how much of them is shared")
    s.add_argument("files", nargs="+")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("df", help="logical and physical bytes of a mount, and what sharing saves")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("status", help="cache and data-file statistics of a mount")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true")


# -- /proc/mounts --------------------------------------------------------------------------------
def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def reflinkfs_mounts() -> dict[str, str]:
    """mountpoint -> store path, for every reflinkfs mount of this machine."""
    found = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            src, mnt, fstype = line.split()[:3]
            if fstype == "fuse.reflinkfs" and src.startswith("reflinkfs:"):
                found[_unescape(mnt)] = _unescape(src)[len("reflinkfs:"):]
    return found


@dataclass
class MountEntry:
    """One line of /proc/self/mountinfo."""
    mount_id: int
    parent_id: int
    mountpoint: str
    fstype: str
    source: str

    @property
    def store(self) -> str | None:
        """The store of a reflinkfs mount (its fsname is reflinkfs:<absolute store path>), else None."""
        if self.fstype == "fuse.reflinkfs" and self.source.startswith("reflinkfs:"):
            return self.source[len("reflinkfs:"):]
        return None


def top_mount(path) -> MountEntry | None:
    """The mount that path resolves to if something is mounted on path itself (the topmost of a stack),
    else None. Reads /proc/self/mountinfo only: never blocks on a dead or wedged FUSE daemon."""
    target = os.path.realpath(path)
    here = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) != target:
                continue
            tail = fields[fields.index("-") + 1:]
            here.append(MountEntry(int(fields[0]), int(fields[1]), target, tail[0], _unescape(tail[1])))
    below = {e.parent_id for e in here}
    tops = [e for e in here if e.mount_id not in below]
    return (tops or here or [None])[-1]


def is_mounted(path) -> bool:
    """Whether something is mounted on path; reads /proc/self/mountinfo, which never blocks on a wedged
    FUSE daemon (unlike stat or os.path.ismount)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == target for line in f)


def lock_holders(store) -> list[int]:
    """Pids of the processes that have STORE/lock open: the daemon of a mounted store."""
    from .meta.schema import LOCK_NAME
    lock = os.path.realpath(os.path.join(store, LOCK_NAME))
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == lock:
                    pids.append(int(pid))
                    break
            except OSError:
                continue
    return pids


def pid_alive(pid: int) -> bool:
    """Whether process pid exists and is not a zombie (a killed daemon that its parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def store_lock(store: str):
    """Hold the store's lock for a with-block if no process holds it; yields False (holding nothing) when
    one does: the daemon of a live mount, a fsck, or another command holding it for a moment; None when
    the lock cannot be opened (the store directory is gone)."""
    from .meta.schema import LOCK_NAME
    try:
        fd = os.open(os.path.join(store, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = True
        except BlockingIOError:
            got = False
        yield got
    finally:
        os.close(fd)


def _answers_enotconn(path: str) -> bool:
    """Whether the mount on path is dead: the kernel itself answers ENOTCONN once its daemon is gone
    (ECONNABORTED for a request caught in the daemon's death). statfs, because the kernel always passes
    it to the daemon: stat may be answered from cached attributes for a second after the daemon died."""
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def _detach(mnt: str) -> None:
    """Lazily detach the mount on mnt (processes still inside keep getting ENOTCONN)."""
    r = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        raise StoreError(f"{mnt}: cannot detach the dead mount: {msg.removeprefix('fusermount3: ')}")


def _mounts_of(store: str) -> list[str]:
    real = os.path.realpath(store)
    return [m for m, s in reflinkfs_mounts().items() if os.path.realpath(s) == real]


def _holders_text(store: str) -> str:
    pids = lock_holders(store)
    return f"process {', '.join(map(str, pids))}" if pids else "another process"


def _lock_for_mount(args) -> int:
    """Take the store's lock for the mount: held from the checks on, handed to the daemon, held by it
    until it has unmounted. So of two `mount` commands of one store, only the first goes on, and while
    we hold it no daemon of this store runs: every mount of it in the table is dead."""
    from .meta import schema
    try:
        return schema.lock_store(args.store)
    except StoreError:
        pass
    here = os.path.realpath(args.mountpoint)
    live = [m for m in _mounts_of(args.store) if not _answers_enotconn(m)]
    if here in live:
        raise StoreError(f"{args.mountpoint}: {args.store} is already mounted here")
    if live:
        raise StoreError(f"{args.store}: store is in use: mounted on {live[0]} (a store is mounted once at a "
                         f"time); unmount it first: 'reflinkfs umount {shlex.quote(live[0])}'")
    raise StoreError(f"{args.store}: store is in use by {_holders_text(args.store)} (a fsck, or another mount "
                     f"starting); wait for it to finish and mount again")


def _clear_mountpoint(args) -> None:
    """Make sure nothing is mounted on the mountpoint: detach a dead mount of this same store (saying so
    on one line); refuse anything else with the command that clears it. The caller holds the store's
    lock (_lock_for_mount), so a mount of this store found here has no daemon, and none can start."""
    mnt = os.path.abspath(args.mountpoint)
    q = shlex.quote(args.mountpoint)
    for _ in range(8):                      # dead mounts of this store stacked on each other
        top = top_mount(mnt)
        if top is None:
            return
        other, dead = top.store, _answers_enotconn(mnt)
        if other is None:
            if dead:
                raise StoreError(f"{args.mountpoint}: a dead {top.fstype} mount ({top.source}) is in the way; "
                                 f"detach it with 'fusermount3 -uz {q}' and mount again")
            raise StoreError(f"{args.mountpoint}: something is already mounted here ({top.fstype} {top.source}); "
                             f"unmount it first: 'umount {q}'")
        if not dead:
            raise StoreError(f"{args.mountpoint}: something is already mounted here (reflinkfs store {other}); "
                             f"unmount it first: 'reflinkfs umount {q}'")
        if os.path.realpath(other) != os.path.realpath(args.store):
            raise StoreError(f"{args.mountpoint}: a dead mount of another store, {other}, is in the way "
                             f"(its daemon died); clear it with 'reflinkfs umount {q}' and mount again")
        _detach(mnt)
        print(f"reflinkfs mount: {args.mountpoint}: the daemon of the last mount of {args.store} had died "
              f"(the mount answered ENOTCONN); detached that dead mount, mounting again", file=sys.stderr)
    raise StoreError(f"{args.mountpoint}: dead mounts are stacked here; clear them with "
                     f"'reflinkfs umount {q}' and mount again")


def store_of(mountpoint: str) -> str:
    mnt = os.path.realpath(mountpoint)
    try:
        return reflinkfs_mounts()[mnt]
    except KeyError:
        raise StoreError(f"{mountpoint}: not a reflinkfs mount") from None


# -- mount ---------------------------------------------------------------------------------------
def _check_mount_args(args) -> None:
    """Checks made holding the store's lock (see _lock_for_mount)."""
    if not os.path.exists("/dev/fuse"):
        raise StoreError("/dev/fuse is missing: load the fuse module (modprobe fuse) or run where FUSE is available")
    _clear_mountpoint(args)
    if not os.path.isdir(args.mountpoint):
        raise StoreError(f"{args.mountpoint}: mountpoint does not exist or is not a directory")
    if os.listdir(args.mountpoint) and not args.nonempty:
        raise StoreError(f"{args.mountpoint}: mountpoint is not empty; to mount over its contents (hidden until "
                         f"unmount) add --nonempty (or -o nonempty)")


def _take_nonempty(args) -> None:
    """`-o nonempty` is ours, not libfuse's (libfuse 3 rejects it): turn it into args.nonempty."""
    kept = []
    for o in args.fuse_options:
        opts = [x for x in o.split(",") if x]
        args.nonempty = args.nonempty or "nonempty" in opts
        rest = ",".join(x for x in opts if x != "nonempty")
        if rest:
            kept.append(rest)
    args.fuse_options = kept


def _options(args, lock_fd: int):
    from .fuse.mount import MountOptions
    return MountOptions(store=args.store, mountpoint=os.path.abspath(args.mountpoint), debug=args.debug,
                        fuse_options=args.fuse_options, cache=args.cache, cache_size=args.cache_size,
                        kernel_cache=args.kernel_cache, commit_interval=args.commit_interval, lock_fd=lock_fd)


def cmd_mount(args) -> int:
    from .meta import schema
    _take_nonempty(args)
    schema.open_store_db(args.store).close()
    lock_fd = _lock_for_mount(args)
    try:
        _check_mount_args(args)
    except BaseException:
        os.close(lock_fd)
        raise
    return _mount(args, _options(args, lock_fd))


def _mount(args, opts) -> int:
    """Mount, in this process (--foreground) or in a daemon forked off; opts.lock_fd goes to the volume."""
    from .fuse import mount
    if args.foreground:
        mount.setup_logging(args.debug, args.log)

        def ready(warning):
            if warning:
                print(warning, file=sys.stderr)
            print(f"mounted {args.store} on {args.mountpoint}", file=sys.stderr)
        try:
            return mount.run(opts, ready)
        except RuntimeError as e:   # pyfuse3's way to say the mount failed; libfuse has printed why
            raise StoreError(f"{args.mountpoint}: cannot mount: {e}") from None

    log_path = os.path.abspath(args.log or os.path.join(args.store, "log"))
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid != 0:
        os.close(opts.lock_fd)          # the daemon's copy holds the lock now (one open file, shared)
    else:                                          # the daemon
        os.close(rfd)
        code = 1
        try:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            logfd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(devnull, 0)
            os.dup2(logfd, 1)
            os.dup2(logfd, 2)
            mount.setup_logging(args.debug, log_path)

            def ready(warning):
                os.write(wfd, f"ok {warning or ''}\n".encode())
                os.close(wfd)
            code = mount.run(opts, ready)
        except (StoreError, OSError, RuntimeError) as e:
            # libfuse prints its reason (e.g. an unknown -o option) to the log, not into the exception
            reason = str(e) if isinstance(e, StoreError) else f"{e} (details in {log_path})"
            try:
                os.write(wfd, f"error {reason}\n".encode())
            except OSError:
                pass
            import logging
            logging.getLogger("reflinkfs").error("mount failed: %s", e)
        except BaseException:
            import logging
            logging.getLogger("reflinkfs").exception("daemon failed")
        finally:
            os._exit(code)
    os.close(wfd)
    msg = b""
    with os.fdopen(rfd, "rb") as r:
        msg = r.readline().decode().strip()
    if msg.startswith("ok"):
        if msg[2:].strip():
            print(msg[2:].strip(), file=sys.stderr)
        return 0
    if msg.startswith("error"):
        os.waitpid(pid, 0)
        raise StoreError(msg[len("error "):])
    os.waitpid(pid, 0)
    raise StoreError(f"the daemon exited before the mount was ready; see {log_path}")


def wait_store_free(store: str, timeout: float) -> bool:
    """True once no process holds the store's lock (the daemon has flushed and exited)."""
    from .meta import schema
    path = os.path.join(store, schema.LOCK_NAME)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
        finally:
            os.close(fd)
        time.sleep(0.05)


def cmd_umount(args) -> int:
    store = store_of(args.mountpoint)
    mnt = os.path.abspath(args.mountpoint)
    top = top_mount(mnt)
    if top is not None and top.store is not None and _answers_enotconn(mnt):
        # A dead mount: nothing to flush, so detach it, even with processes inside. Under the store's lock
        # when it is free, and only if it is still the same mount, so that a `mount` of the store that
        # recovers this mountpoint meanwhile never has its new, live mount detached.
        with store_lock(top.store):
            if top_mount(mnt) == top and _answers_enotconn(mnt):
                _detach(mnt)
                print(f"reflinkfs umount: {args.mountpoint}: the daemon of this mount of {store} had died; "
                      f"detached the dead mount (changes after its last commit are lost)", file=sys.stderr)
                return 0
    r = subprocess.run(["fusermount3", "-u", args.mountpoint], capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        raise StoreError(f"{args.mountpoint}: cannot unmount: {msg.removeprefix('fusermount3: ')}")
    if not wait_store_free(store, UMOUNT_WAIT):
        raise StoreError(f"{args.mountpoint}: unmounted, but the daemon has not finished flushing {store} "
                         f"after {UMOUNT_WAIT:.0f} s")
    return 0


# -- inspection through virtual extended attributes -----------------------------------------------
XATTR_EXTENTS = "user.reflinkfs.extents"
XATTR_STATUS = "user.reflinkfs.status"
XATTR_CLONE = "user.reflinkfs.clone-from"
XATTR_CLONE_TREE = "user.reflinkfs.clone-tree"


def _mount_root(path: str) -> str:
    """The reflinkfs mountpoint that holds path (StoreError if none)."""
    dev = os.stat(path).st_dev
    for mnt in reflinkfs_mounts():
        try:
            if os.stat(mnt).st_dev == dev:
                return mnt
        except OSError:
            continue
    raise StoreError(f"{path}: not inside a reflinkfs mount")


def _status(mountpoint: str) -> dict:
    import json
    root = os.path.realpath(mountpoint)
    if root not in reflinkfs_mounts():
        raise StoreError(f"{mountpoint}: not a reflinkfs mount")
    return json.loads(os.getxattr(root, XATTR_STATUS))


def file_extents(path: str) -> dict:
    """A file's extent map as the mount reports it (all pages)."""
    import json
    _mount_root(path)
    if not os.path.isfile(path):
        raise StoreError(f"{path}: not a regular file")
    info = json.loads(os.getxattr(path, XATTR_EXTENTS))
    page = info
    while page.get("next"):
        page = json.loads(os.getxattr(path, page["next"]))
        info["extents"] += page["extents"]
    info.pop("next", None)
    return info


def cmd_stat(args) -> int:
    import json
    out = {}
    for path in args.files:
        out[path] = file_extents(path)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for path, info in out.items():
        bs = info["block_size"]
        print(f"File: {path}  size {info['size']} bytes, {info['count']} extent(s), block size {bs}")
        print(f"{'ext':>4} {'logical':>21} {'physical':>21} {'length':>8} {'refs':>5}  flags")
        for i, (lb, pb, n, rc) in enumerate(info["extents"]):
            print(f"{i:>4} {lb:>10}..{lb + n - 1:<9} {pb:>10}..{pb + n - 1:<9} {n:>8} {rc:>5}  "
                  f"{'shared' if rc > 1 else ''}")
        print(f"shared: {info['shared_bytes']} bytes, exclusive: {info['exclusive_bytes']} bytes")
    return 0


def cmd_df(args) -> int:
    import json
    u = _status(args.mountpoint)["usage"]
    if args.json:
        print(json.dumps(u))
        return 0
    print(f"logical bytes:   {u['logical_bytes']}")
    print(f"physical bytes:  {u['physical_bytes']}")
    print(f"saved bytes:     {u['saved_bytes']}")
    print(f"sharing ratio:   {u['sharing_ratio']:.2f}")
    return 0


def cmd_status(args) -> int:
    import json
    st = _status(args.mountpoint)
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    c = st["cache"]
    print(f"cache: {c['mode']}" + (f" ({c['policy']}, budget {c['budget_bytes']} bytes, unit {c['unit_bytes']})"
                                   if "policy" in c else ""))
    for k in ("hits", "misses", "evictions", "readahead_loads", "resident_bytes", "distinct_physical_bytes",
              "bytes_served"):
        if k in c:
            print(f"  {k}: {c[k]}")
    d = st["data_file"]
    print(f"data file: read {d['bytes_read']} bytes, written {d['bytes_written']} bytes, "
          f"O_DIRECT {'on' if d['direct_io'] else 'off (pages dropped with fadvise)'}, "
          f"RWF_DONTCACHE {'on' if d.get('dontcache') else 'off'}")
    print(f"clones: {st.get('clones', 0)} ({st.get('cloned_bytes', 0)} bytes); copy_file_range handled: "
          f"{'yes' if st.get('copy_file_range_handled') else 'NO'}")
    return 0


# -- clone ---------------------------------------------------------------------------------------
def _clone_file(src: str, dst: str, force: bool) -> None:
    import errno
    if not os.path.isfile(src):
        raise StoreError(f"{src}: not a regular file (use -r for a directory)")
    if os.path.lexists(dst) and not force:
        raise StoreError(f"{dst}: exists (use --force to replace it)")
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(sfd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (0 if force else os.O_EXCL)
        dfd = os.open(dst, flags, st.st_mode & 0o7777)
        try:
            if os.fstat(dfd).st_dev != st.st_dev:
                raise StoreError(f"{dst}: not on the same reflinkfs mount as {src}")
            try:
                os.setxattr(dfd, XATTR_CLONE, str(st.st_ino).encode())
            except OSError as e:
                reason = {errno.EPERM: "permission denied", errno.EACCES: "permission denied",
                          errno.ENOSPC: "no space left in the store",
                          errno.EINVAL: "source and destination are the same file"}.get(e.errno, e.strerror)
                raise StoreError(f"cannot clone {src} to {dst}: {reason}") from None
            # The daemon dropped the kernel's cached attributes of dst; fetch them now, so that what
            # the kernel decides from its cached size (where an O_APPEND write goes) is right at once.
            os.fstat(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def cmd_clone(args) -> int:
    src_root = _mount_root(args.src)
    parent = os.path.dirname(os.path.abspath(args.dst)) or "."
    if os.path.isdir(args.dst) and not args.recursive:
        dst = os.path.join(args.dst, os.path.basename(os.path.normpath(args.src)))
    else:
        dst = args.dst
        if not os.path.isdir(parent):
            raise StoreError(f"{parent}: no such directory")
    if _mount_root(os.path.dirname(os.path.abspath(dst)) or ".") != src_root:
        raise StoreError(f"{dst}: not on the same reflinkfs mount as {args.src} (clones cannot cross mounts)")
    if os.path.isdir(args.src):
        if not args.recursive:
            raise StoreError(f"{args.src}: is a directory (use -r)")
        # a destination inside the source would be scanned while it grows: nested copies until ENAMETOOLONG
        real_src, real_dst = os.path.realpath(args.src), os.path.realpath(dst)
        if real_dst == real_src or real_dst.startswith(real_src.rstrip(os.sep) + os.sep):
            raise StoreError(f"{dst}: is inside {args.src}; cannot clone a directory into itself")
        if os.path.lexists(dst) and not args.force:
            raise StoreError(f"{dst}: exists (use --force to merge into it)")
        started = time.monotonic()
        if args.force:
            # --force merges into an existing tree entry by entry (the walk below, not one request)
            entries = sum(len(d) + len(f) for _, d, f in os.walk(args.src))
            _clone_tree(args.src, dst, args.force)
            result = {"entries": entries, "bytes_shared": None, "seconds": time.monotonic() - started}
        else:
            result = _clone_tree_request(src_root, args.src, dst)
    else:
        started = time.monotonic()
        _clone_file(args.src, dst, args.force)
        result = {"entries": 1, "bytes_shared": os.stat(dst).st_blocks * 512,
                  "seconds": time.monotonic() - started}
    if getattr(args, "json", False):
        print(json.dumps(result))
    return 0


PROGRESS_AFTER = 0.5     # seconds before a progress bar appears (small trees show none)


def _clone_tree_request(mount_root: str, src: str, dst: str) -> dict:
    """`clone -r` as one request: the daemon clones the tree and makes DST appear at once (see
    core/treeclone.py). A progress bar on a terminal while it runs; the outcome as a dict."""
    import threading
    src_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        src_ino = os.fstat(src_fd).st_ino
    finally:
        os.close(src_fd)
    parent = os.path.dirname(os.path.abspath(dst)) or "."
    name = os.fsencode(os.path.basename(os.path.abspath(dst)))
    token = os.urandom(8).hex()
    query = f"{XATTR_CLONE_TREE}.{token}"

    def outcome() -> dict:
        try:
            return json.loads(os.getxattr(mount_root, query))
        except OSError:
            return {}

    done = threading.Event()
    bar = _ProgressBar() if sys.stderr.isatty() else None

    def watch() -> None:
        if done.wait(PROGRESS_AFTER):
            return
        while not done.is_set():
            info = outcome()
            if info.get("entries_total"):
                bar.show(info["entries_done"], info["entries_total"])
            done.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True) if bar else None
    if watcher:
        watcher.start()
    pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.setxattr(pfd, XATTR_CLONE_TREE, b"%d\0%s\0%s" % (src_ino, token.encode(), name))
    except OSError as e:
        info = outcome()
        reason = info.get("error") or e.strerror
        if e.errno in (errno.EPERM, errno.EACCES) and not info.get("error"):
            reason = "permission denied"
        raise StoreError(f"cannot clone {src} to {dst}: {reason}") from None
    finally:
        os.close(pfd)
        done.set()
        if watcher:
            watcher.join()
            bar.finish()
    info = outcome()
    return {"entries": info.get("entries_done"), "bytes_shared": info.get("bytes_shared"),
            "seconds": info.get("seconds"), "longest_step_ms": info.get("longest_step_ms")}


class _ProgressBar:
    """entries done / total on one terminal line (stderr), redrawn in place."""
    WIDTH = 30

    def __init__(self):
        self.shown = False

    def show(self, done: int, total: int) -> None:
        filled = self.WIDTH * done // max(total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total} entries")
        sys.stderr.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _clone_tree(src: str, dst: str, force: bool) -> None:
    st = os.lstat(src)
    os.makedirs(dst, exist_ok=force)
    for entry in os.scandir(src):
        s, d = entry.path, os.path.join(dst, entry.name)
        if entry.is_symlink():
            if os.path.lexists(d) and force:
                os.unlink(d)
            os.symlink(os.readlink(s), d)
        elif entry.is_dir():
            _clone_tree(s, d, force)
        elif entry.is_file():
            _clone_file(s, d, force)
        else:
            raise StoreError(f"{s}: special file; only regular files, directories and symlinks are cloned")
    os.chmod(dst, st.st_mode & 0o7777)
