"""Command line: `reflinkfs mkfs | fsck | mount | umount | clone | stat | df | du | status`.

Every failure a user can cause ends as one line on stderr and a non-zero exit, never a traceback.
`main(argv)` returns the exit code, so tests call it directly.
"""
from __future__ import annotations

import argparse
import sys

from .errors import FsError, StoreError
from .units import parse_size


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"reflinkfs: {message}\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="reflinkfs", description="A FUSE filesystem whose reflinked files share one page cache.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    s = sub.add_parser("mkfs", help="create a store")
    s.add_argument("store")
    s.add_argument("--size", type=parse_size, default=0, help="limit the store's data to this many bytes")

    s = sub.add_parser("fsck", help="check a store that is not mounted")
    s.add_argument("store")
    s.add_argument("--repair", action="store_true", help="fix what can be fixed")
    s.add_argument("--verify-data", action="store_true", help="also verify every block's checksum")

    from . import commands, du
    commands.add_parsers(sub)
    du.add_parser(sub)
    return p.parse_args(argv)


def cmd_mkfs(args) -> int:
    from .meta.schema import mkfs
    mkfs(args.store, size_limit=args.size)
    print(f"created store {args.store}" + (f" limited to {args.size} bytes" if args.size else ""))
    return 0


def cmd_fsck(args) -> int:
    from .check import fsck
    from .progress import Progress
    with Progress(0, "verifying data", enabled=None if args.verify_data else False) as progress:
        rep = fsck(args.store, repair_=args.repair, verify_data=args.verify_data, progress=progress)
    for f in rep.findings:
        print(f)
    for r in rep.repaired:
        print(f"repaired: {r}")
    for u in rep.unrepairable:
        print(f"not repaired: {u}")
    if rep.clean:
        print(f"{args.store}: clean", file=sys.stderr)
        return 0
    if args.repair and not rep.unrepairable:
        return 0 if rep.repaired else 1
    return 1


COMMANDS = ("mkfs", "fsck", "mount", "umount", "clone", "stat", "df", "status", "du")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        # `reflinkfs STORE MNT -o OPTS`: how fuse3's mount.fuse3 runs the program of a fuse.reflinkfs mount
        from . import mounthelper
        return mounthelper.main(main, argv, prog="reflinkfs")
    args = parse_args(argv)
    handler = getattr(args, "handler", None) or globals().get(f"cmd_{args.cmd}")
    if handler is None:
        from . import commands
        handler = getattr(commands, f"cmd_{args.cmd}")
    try:
        return handler(args)
    except (StoreError, FsError) as e:
        print(f"reflinkfs {args.cmd}: {e if isinstance(e, StoreError) else e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"reflinkfs {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        name = f" {e.filename}:" if e.filename else ""
        print(f"reflinkfs {args.cmd}:{name} {e.strerror or e}", file=sys.stderr)
        return 1


def mount_helper(argv: list[str] | None = None) -> int:
    """`mount.fuse.reflinkfs STORE MNT [-o OPTS]`: what mount(8) runs for -t fuse.reflinkfs."""
    from . import mounthelper
    return mounthelper.main(main, argv)


if __name__ == "__main__":
    sys.exit(main())
