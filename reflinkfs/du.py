"""`reflinkfs du PATH...`: total, exclusive and shared bytes of each path, and what the paths share.

The figures are defined in core/du.py. Each path is one root; the paths of one mount go to the daemon as
one request (the virtual attribute user.reflinkfs.du.<ino>.<ino>... read on the first path), which it
answers from its database, however many files the trees hold. Paths on different mounts are reported
per mount.
"""
from __future__ import annotations

import errno
import json
import os
import sys

from .client import read_attribute
from .errors import StoreError
from .xattrs import DU as XATTR_DU

XATTR_NAME_MAX = 255
FIELDS = ("total", "exclusive", "shared", "set_shared", "set_exclusive")
HEADINGS = ("Total", "Exclusive", "Shared", "Set shared", "Set excl.")

def add_parser(sub) -> None:
    s = sub.add_parser("du", help="total, exclusive and shared bytes of files and trees (like btrfs fi du -s)")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--json", action="store_true")
    s.add_argument("--raw", action="store_true", help="bytes instead of KiB, MiB, GiB")
    s.set_defaults(handler=cmd_du)


def _request(paths: list[str], inos: list[int]) -> dict:
    name = XATTR_DU + "".join(f".{i}" for i in inos[1:])
    try:
        return json.loads(read_attribute(paths[0], name))
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            raise StoreError(f"{paths[0]}: not inside a reflinkfs mount (or in one whose daemon predates du: "
                             f"unmount and mount it again)") from None
        raise


def usage(paths: list[str]) -> dict:
    """{"block_size", "paths": {path: figures}, "sets": [{"paths": [...], figures..., shared_between}]}.
    Paths are grouped by filesystem (st_dev): one request for each group, which the daemon refuses
    unless it is a reflinkfs mount."""
    groups: dict[int, list[tuple[str, int]]] = {}
    for p in paths:
        st = os.stat(p)
        groups.setdefault(st.st_dev, []).append((p, st.st_ino))
    out: dict = {"block_size": 4096, "paths": {}, "sets": []}
    for members in groups.values():
        names = [p for p, _ in members]
        inos = [i for _, i in members]
        if len(XATTR_DU + "".join(f".{i}" for i in inos[1:])) <= XATTR_NAME_MAX:
            answers = [_request(names, inos)]
        else:       # too many paths for one attribute name: one request each, and no figures for the set
            answers = [_request([p], [i]) for p, i in members]
        figures = [f for a in answers for f in a["paths"]]
        out["paths"].update(zip(names, figures))
        if "set" in answers[0]:
            out["sets"].append({"paths": names, **answers[0]["set"]})
        elif len(members) > 1:
            out["sets"].append({"paths": names, "note": "too many paths for one request; no set figures"})
    return out


def _human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n}B"


def cmd_du(args) -> int:
    res = usage(args.paths)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    fmt = (lambda n: str(n)) if args.raw else _human
    print("".join(f"{h:>12}" for h in HEADINGS) + "  Filename")
    for path, f in res["paths"].items():
        print("".join(f"{fmt(f[k]):>12}" for k in FIELDS) + f"  {path}")
    for s in res["sets"]:
        if "note" in s:
            print(f"set of {len(s['paths'])} paths: {s['note']}", file=sys.stderr)
            continue
        print("".join(f"{fmt(s[k]):>12}" for k in FIELDS) + f"  (set of {len(s['paths'])} paths; "
              f"shared between them: {fmt(s['shared_between'])})")
    return 0
