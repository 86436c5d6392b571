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
        return mount.run(opts, ready)

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
            try:
                os.write(wfd, f"error {e}\n".encode())
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
