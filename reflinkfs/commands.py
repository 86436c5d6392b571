"""The commands that work through a mount: clone, stat, df, status; and the parsers of every command
that takes a mount (mount and umount themselves are in daemon.py).
"""
from __future__ import annotations

import errno
import json
import os
import time

from .client import file_extents, mount_root, read_attribute, status_of
from .errors import StoreError
from .mounts import store_of
from .progress import Progress
from .xattrs import CLONE_FROM as XATTR_CLONE
from .xattrs import CLONE_TREE as XATTR_CLONE_TREE
from .xattrs import STATUS as XATTR_STATUS


def add_parsers(sub) -> None:
    """The subcommands that take a mount; each names its handler (set_defaults). daemon.py is imported
    only by the commands that use it (its imports cost every other command's start-up)."""
    from .units import parse_size
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
    s.add_argument("--cache-size", type=parse_size, default=None,
                   help="fix the cache budget, in bytes (default: a quarter of RAM, lowered under memory pressure)")
    s.add_argument("--kernel-cache", action="store_true",
                   help="let the kernel cache mount files too (for comparison; costs one copy per inode)")
    s.add_argument("--commit-interval", type=float, default=5.0, help="seconds between metadata commits")
    s.add_argument("--passthrough", choices=["auto", "off"], default="auto",
                   help="auto: the kernel reads whole files opened read-only straight from the store, with one "
                        "page cache for all their clones, where it can (root, Linux >= 6.9); off: every file "
                        "through the daemon")
    s.add_argument("--log", help="daemon log file (default: STORE/log)")
    s.set_defaults(handler=_cmd_mount)

    s = sub.add_parser("umount", help="unmount, flushing everything to the store")
    s.add_argument("mountpoint")
    s.set_defaults(handler=_cmd_umount)

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
    s.add_argument("--json", action="store_true", help="everything the daemon reports, as JSON "
                   "(with --watch: one JSON object per line)")
    s.add_argument("--watch", action="store_true", help="a line per interval: requests/s, cache hit rate, "
                   "bytes served (until Ctrl-C)")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between --watch lines (default 1)")
    s.add_argument("--count", type=int, help="stop --watch after this many lines")


def _cmd_mount(args) -> int:
    from . import daemon
    return daemon.cmd_mount(args)


def _cmd_umount(args) -> int:
    from . import daemon
    return daemon.cmd_umount(args)


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
        seg = "several or none" if info["segment"] is None else info["segment"]
        print(f"segment: {seg}, " + ("whole" if info["whole"] else f"not whole ({info['not_whole_because']})"))
    return 0


def cmd_df(args) -> int:
    import json
    u = status_of(args.mountpoint)["usage"]
    if args.json:
        print(json.dumps(u))
        return 0
    print(f"logical bytes:   {u['logical_bytes']}")
    print(f"physical bytes:  {u['physical_bytes']}")
    print(f"saved bytes:     {u['saved_bytes']}")
    print(f"sharing ratio:   {u['sharing_ratio']:.2f}")
    print(f"whole files:     {u['whole_files']} ({u['whole_bytes']} bytes)")
    return 0


def cmd_status(args) -> int:
    import json
    st = status_of(args.mountpoint)
    if args.watch:
        from .watch import cmd_watch
        fd = os.open(os.path.realpath(args.mountpoint), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:        # through a descriptor: no lookups of its own in the requests it counts
            return cmd_watch(args, lambda: json.loads(read_attribute(fd, XATTR_STATUS)))
        finally:
            os.close(fd)
    if args.json:
        print(json.dumps({"mountpoint": os.path.realpath(args.mountpoint), "store": store_of(args.mountpoint),
                          **st}, indent=1))
        return 0
    c = st["cache"]
    print(f"cache: {c['mode']}" + (f" ({c['policy']}, budget {c['budget_bytes']} bytes, unit {c['unit_bytes']})"
                                   if "policy" in c else ""))
    if "budget_source" in c:
        print(f"  budget: {c['budget_bytes']} bytes, {c['budget_source']}; held: {c['resident_bytes']} bytes")
        s = c.get("last_shrink")
        print("  last shrink: " + ("never" if not s else
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(s['at']))}, {s['from_bytes']} -> "
              f"{s['to_bytes']} bytes ({s['freed_bytes']} evicted): {s['reason']}"))
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
    p = st.get("passthrough", {})
    if p.get("active"):
        refused = ", ".join(f"{k}: {v}" for k, v in sorted(p["refusals"].items())) or "none"
        print(f"passthrough: on; open now {p['open_now']}, opens {p['opens']}, backing files {p['backing_files']}; "
              f"daemon path instead: {refused}; writers waited {p['write_waits']}, ETXTBSY {p['busy']}")
    else:
        print(f"passthrough: off ({p.get('unavailable') or p.get('mode', 'off')})")
    return 0


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
                          errno.EINVAL: "source and destination are the same file"}.get(e.errno or 0, e.strerror)
                raise StoreError(f"cannot clone {src} to {dst}: {reason}") from None
            # The daemon dropped the kernel's cached attributes of dst; fetch them now, so that what
            # the kernel decides from its cached size (where an O_APPEND write goes) is right at once.
            os.fstat(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def cmd_clone(args) -> int:
    src_root = mount_root(args.src)
    parent = os.path.dirname(os.path.abspath(args.dst)) or "."
    if os.path.isdir(args.dst) and not args.recursive:
        dst = os.path.join(args.dst, os.path.basename(os.path.normpath(args.src)))
    else:
        dst = args.dst
        if not os.path.isdir(parent):
            raise StoreError(f"{parent}: no such directory")
    if mount_root(os.path.dirname(os.path.abspath(dst)) or ".") != src_root:
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


def _wait_for_tree_clone(root: str, query: str, src: str, dst: str) -> dict:
    """Poll a started tree clone's outcome until it is done (returned) or failed (StoreError)."""
    pause = 0.001
    while True:
        try:
            info = json.loads(os.getxattr(root, query))
        except OSError as e:
            raise StoreError(f"cannot clone {src} to {dst}: lost the clone's outcome ({e.strerror})") from None
        if info.get("phase") == "done":
            return info
        if info.get("phase") == "failed":
            reason = info.get("error") or os.strerror(info.get("errno") or errno.EIO)
            raise StoreError(f"cannot clone {src} to {dst}: {reason}")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _clone_tree_request(root: str, src: str, dst: str) -> dict:
    """`clone -r` as one request: the daemon clones the tree and makes DST appear at once (see
    core/treeclone.py). A progress bar on a terminal while it runs; the outcome as a dict."""
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
            return json.loads(os.getxattr(root, query))
        except OSError:
            return {}

    bar = Progress(0, "entries cloned", unit="")          # draws only on a terminal
    watcher = done = None
    if bar.enabled:                 # threading only then: its import adds to every clone's start-up
        import threading
        done = threading.Event()

        def watch() -> None:
            if done.wait(PROGRESS_AFTER):
                return
            while not done.is_set():
                info = outcome()
                if info.get("entries_total"):
                    bar.total = info["entries_total"]
                    bar.advance(info["entries_done"] - bar.done)
                done.wait(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # answered once the clone has started (the kernel locks DST's parent until then); the outcome is
        # polled on the root, which takes no directory lock
        try:
            os.setxattr(pfd, XATTR_CLONE_TREE, b"%d\0%s\0%s" % (src_ino, token.encode(), name))
        except OSError as e:
            reason = "permission denied" if e.errno in (errno.EPERM, errno.EACCES) else e.strerror
            raise StoreError(f"cannot clone {src} to {dst}: {reason}") from None
        info = _wait_for_tree_clone(root, query, src, dst)
    finally:
        os.close(pfd)
        if watcher and done:
            done.set()
            watcher.join()
            bar.close()
    return {"entries": info.get("entries_done"), "bytes_shared": info.get("bytes_shared"),
            "seconds": info.get("seconds"), "longest_step_ms": info.get("longest_step_ms")}


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

