"""mount and umount: starting the daemon, and ending it.

A dead mount is a reflinkfs mount whose daemon has died (kill -9, OOM, a crash): it stays in the mount
table and every access to it fails with ENOTCONN until it is detached. A daemon holds its store's lock
from before it mounts until after it has unmounted, so a reflinkfs mount whose store lock is free has
no daemon: it is dead. `mount` detaches a dead mount of the same store (while holding that store's
lock, so that two `mount` commands racing on it cannot both go on, and no live mount is ever detached)
and then mounts as usual; any other mount in the way is refused with the command that clears it.
`umount` detaches a dead mount (lazily: processes inside it keep getting ENOTCONN) and says so.
"""
from __future__ import annotations

import fcntl
import os
import shlex
import subprocess
import sys
import time

from .errors import StoreError
from .mounts import answers_enotconn, detach, holders_text, mounts_of, store_lock, store_of, top_mount

MOUNT_WAIT = 30.0
UMOUNT_WAIT = 120.0


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
    live = [m for m in mounts_of(args.store) if not answers_enotconn(m)]
    if here in live:
        raise StoreError(f"{args.mountpoint}: {args.store} is already mounted here")
    if live:
        raise StoreError(f"{args.store}: store is in use: mounted on {live[0]} (a store is mounted once at a "
                         f"time); unmount it first: 'reflinkfs umount {shlex.quote(live[0])}'")
    raise StoreError(f"{args.store}: store is in use by {holders_text(args.store)} (a fsck, or another mount "
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
        other, dead = top.store, answers_enotconn(mnt)
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
        detach(mnt)
        print(f"reflinkfs mount: {args.mountpoint}: the daemon of the last mount of {args.store} had died "
              f"(the mount answered ENOTCONN); detached that dead mount, mounting again", file=sys.stderr)
    raise StoreError(f"{args.mountpoint}: dead mounts are stacked here; clear them with "
                     f"'reflinkfs umount {q}' and mount again")


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
                        kernel_cache=args.kernel_cache, commit_interval=args.commit_interval, lock_fd=lock_fd,
                        passthrough=args.passthrough)


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
    if args.passthrough == "auto":
        from .fuse.passthrough import has_cap_sys_admin, precheck
        why = precheck(has_cap_sys_admin(), os.uname().release)
        if why:    # said once, here; the daemon's log says it too, with what INIT tells
            print(f"reflinkfs mount: passthrough unavailable: {why}; every file is served through the daemon",
                  file=sys.stderr)
    return _mount(args, _options(args, lock_fd))


def _mount(args, opts) -> int:
    """Mount, in this process (--foreground) or in a daemon forked off; opts.lock_fd goes to the volume."""
    from .fuse import mount
    if args.foreground:
        mount.setup_logging(args.debug, args.log)

        def ready():
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

            def ready():
                os.write(wfd, b"ok\n")
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
    with os.fdopen(rfd, "rb") as r:
        msg = r.readline().decode().strip()
    if msg == "ok":
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
    if top is not None and top.store is not None and answers_enotconn(mnt):
        # A dead mount: nothing to flush, so detach it, even with processes inside. Under the store's lock
        # when it is free, and only if it is still the same mount, so that a `mount` of the store that
        # recovers this mountpoint meanwhile never has its new, live mount detached.
        with store_lock(top.store):
            if top_mount(mnt) == top and answers_enotconn(mnt):
                detach(mnt)
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

