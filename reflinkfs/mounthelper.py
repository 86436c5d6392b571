"""`mount -t fuse.reflinkfs` and /etc/fstab: the mount helper, `mount.fuse.reflinkfs STORE MNT -o OPTS`.

How a mount of type fuse.reflinkfs reaches reflinkfs (util-linux 2.38, Debian fuse3):
- mount(8) runs `/sbin/mount.fuse.reflinkfs STORE MNT [-sfnv] [-N NS] -o OPTS` if that file exists
  (its search path is /sbin, /sbin/fs.d, /sbin/fs; nothing else). Before that, libmount has removed the
  options meant for itself: `defaults`, `noauto`, `x-*` (x-systemd.*), `comment=`; it passes `_netdev`,
  `nofail`, `user` (expanded to nodev,noexec,nosuid) and always `rw` or `ro`.
- Without that file it falls back to `/sbin/mount.fuse` (fuse3's mount.fuse3), which drops `user`,
  `nouser`, `users`, `auto`, `noauto`, `_netdev`, `nofail`, adds `dev,suid` unless told nodev/nosuid, and
  runs `/bin/sh -c "reflinkfs STORE MNT -o OPTS"`: the program named after the subtype, found in PATH.
  `reflinkfs` takes that form too (cli.main hands it here), so either route ends in `main` below,
  which runs the command line it is given (no import of cli: cli imports this module).

`main` turns the -o list into `reflinkfs mount` arguments: our own options by name (TABLE), the
options only mount(8) or systemd act on dropped (IGNORED), everything else passed to libfuse as FUSE
options (`allow_other`, `ro`, `nodev`, ...). It then runs `reflinkfs mount`, which returns once the
mount is ready and leaves the daemon running, as a helper must.

The system's `umount MNT` needs no helper: the kernel ends the FUSE session, and the daemon commits
everything and exits (fuse/mount.py). It does not wait for that commit, as `reflinkfs umount` does.
"""
from __future__ import annotations

import os
import sys

# -o NAME[=VALUE] -> the `reflinkfs mount` argument; a flag takes no value.
TABLE = {
    "cache": ("--cache", True),
    "cache_size": ("--cache-size", True),
    "kernel_cache": ("--kernel-cache", False),
    "commit_interval": ("--commit-interval", True),
    "passthrough": ("--passthrough", True),
    "nonempty": ("--nonempty", False),
    "debug": ("--debug", False),
    "foreground": ("--foreground", False),
    "log": ("--log", True),
}
# What mount(8), mount.fuse3 or systemd act on, never libfuse (it would refuse them).
IGNORED = {"", "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "_netdev",
           "nofail"}
IGNORED_PREFIXES = ("x-", "comment=")
PROG = "mount.fuse.reflinkfs"
USAGE = f"usage: {PROG} STORE MOUNTPOINT [-o OPT[,OPT...]] [-t fuse.reflinkfs] [-n] [-v] [-f] [-s]"


class UsageError(Exception):
    pass


def translate(options: list[str]) -> list[str]:
    """-o option lists -> `reflinkfs mount` arguments (ours by name, the rest as one FUSE -o list)."""
    args, fuse = [], []
    for text in options:
        for opt in text.split(","):
            name, eq, value = opt.partition("=")
            if opt in IGNORED or opt.startswith(IGNORED_PREFIXES):
                continue
            if name in TABLE:
                flag, takes_value = TABLE[name]
                if takes_value and not (eq and value):
                    raise UsageError(f"option {name} needs a value ({name}=...)")
                if not takes_value and eq:
                    raise UsageError(f"option {name} takes no value")
                args += [flag, value] if takes_value else [flag]
            else:
                fuse.append(opt)
    return args + (["-o", ",".join(fuse)] if fuse else [])


def parse(argv: list[str]) -> tuple[str, str, list[str], dict]:
    """The helper's command line, as mount(8) and mount.fuse3 give it: STORE MNT then flags in any order."""
    if len(argv) < 2 or argv[0].startswith("-") or argv[1].startswith("-"):
        raise UsageError(USAGE)
    store, mnt, rest = argv[0], argv[1], argv[2:]
    options: list[str] = []
    flags = {"fake": False, "verbose": False}
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in ("-o", "-t", "-N"):
            if i + 1 >= len(rest):
                raise UsageError(f"option {a} needs an argument")
            if a == "-o":
                options.append(rest[i + 1])
            elif a == "-t" and rest[i + 1] not in ("fuse.reflinkfs", "reflinkfs"):
                raise UsageError(f"type {rest[i + 1]} is not fuse.reflinkfs")
            elif a == "-N":
                raise UsageError("mounting in another namespace (-N) is not supported")
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            options.append(a[2:])
        elif a.startswith("-") and len(a) > 1 and set(a[1:]) <= set("sfnvi"):
            # -s sloppy, -n no mtab, -i (no-ops here); -f fake: do everything but mount; -v verbose
            flags["fake"] = flags["fake"] or "f" in a
            flags["verbose"] = flags["verbose"] or "v" in a
        else:
            raise UsageError(f"unexpected argument {a!r}; {USAGE}")
        i += 1
    return store, mnt, options, flags


def main(run, argv: list[str] | None = None, prog: str = PROG) -> int:
    """Mount as mount(8) asks: `run` is the command line's main (reflinkfs.cli.main), given the translated
    `reflinkfs mount` arguments."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        store, mnt, options, flags = parse(argv)
        mount_args = ["mount", store, mnt, *translate(options)]
    except UsageError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1      # mount(8)'s "incorrect invocation or permissions"
    if flags["verbose"] or flags["fake"]:
        print(f"{prog}: reflinkfs " + " ".join(mount_args), file=sys.stderr)
    if flags["fake"]:
        return 0
    try:
        rc = run(mount_args)
    except SystemExit as e:        # argparse refused a value (its one-line message is out)
        rc = 1 if e.code else 0
    return 32 if rc else 0        # mount(8)'s "mount failure"


# -- make install ----------------------------------------------------------------------------------
WRAPPER_MARK = "# reflinkfs mount helper"


def wrapper_text(venv_bin: str) -> str:
    """The /sbin/mount.fuse.reflinkfs that `make install` writes: it runs this checkout's environment."""
    return (f"#!/bin/sh\n{WRAPPER_MARK}: installed by `make install`; runs the reflinkfs of {venv_bin}\n"
            f"exec {venv_bin}/{PROG} \"$@\"\n")


def install(sbin: str, venv_bin: str) -> str:
    path = os.path.join(sbin, PROG)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(wrapper_text(venv_bin))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def uninstall(sbin: str) -> str | None:
    """Remove the helper if `make install` wrote it (never a file something else put there)."""
    path = os.path.join(sbin, PROG)
    try:
        with open(path) as f:
            ours = WRAPPER_MARK in f.read(4096)
    except FileNotFoundError:
        return None
    if not ours:
        raise SystemExit(f"{path}: not written by reflinkfs's make install; left alone")
    os.unlink(path)
    return path


if __name__ == "__main__":      # python -m reflinkfs.mounthelper install|uninstall SBIN_DIR
    if len(sys.argv) == 3 and sys.argv[1] == "install":
        print(install(sys.argv[2], os.path.dirname(os.path.abspath(sys.executable))))
    elif len(sys.argv) == 3 and sys.argv[1] == "uninstall":
        print(uninstall(sys.argv[2]) or "nothing installed")
    else:
        sys.exit("usage: python -m reflinkfs.mounthelper install|uninstall SBIN_DIR")
