"""Commands that work on mounts: mount, umount (and, through the mount, clone, stat, df, status)."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

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
                   help="FUSE mount options, e.g. allow_other")
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
    s.add_argument("-f", "--force", action="store_true", help="replace an existing destination file")

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


def store_of(mountpoint: str) -> str:
    mnt = os.path.realpath(mountpoint)
    try:
        return reflinkfs_mounts()[mnt]
    except KeyError:
        raise StoreError(f"{mountpoint}: not a reflinkfs mount") from None


# -- mount ---------------------------------------------------------------------------------------
def _check_mount_args(args) -> None:
    from .meta import schema
    if not os.path.exists("/dev/fuse"):
        raise StoreError("/dev/fuse is missing: load the fuse module (modprobe fuse) or run where FUSE is available")
    if not os.path.isdir(args.mountpoint):
        raise StoreError(f"{args.mountpoint}: mountpoint does not exist or is not a directory")
    if os.path.ismount(args.mountpoint) or os.path.realpath(args.mountpoint) in reflinkfs_mounts():
        raise StoreError(f"{args.mountpoint}: something is already mounted here")
    if os.listdir(args.mountpoint) and "nonempty" not in ",".join(args.fuse_options):
        raise StoreError(f"{args.mountpoint}: mountpoint is not empty")
    schema.open_store_db(args.store).close()


def _options(args):
    from .fuse.mount import MountOptions
    return MountOptions(store=args.store, mountpoint=os.path.abspath(args.mountpoint), debug=args.debug,
                        fuse_options=args.fuse_options, cache=args.cache, cache_size=args.cache_size,
                        kernel_cache=args.kernel_cache, commit_interval=args.commit_interval)


def cmd_mount(args) -> int:
    from .fuse import mount
    _check_mount_args(args)
    opts = _options(args)
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
    if pid == 0:                                   # the daemon
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
        _clone_tree(args.src, dst, args.force)
    else:
        _clone_file(args.src, dst, args.force)
    return 0


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
