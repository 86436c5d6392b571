"""What a mount says about sharing: the status and extents virtual xattrs, read the way tests need them.

`counters(mnt)` gathers the numbers that tell whether file data moved: data-file bytes read and written,
bytes served by the read path, clone requests the daemon answered, and the bytes sharing saves. A copy
that gives the right bytes proves nothing by itself (the kernel silently falls back to read/write when
the daemon does not handle copy_file_range); these counters do.
"""
from __future__ import annotations

import json
import os

BS = 4096
XATTR_STATUS = "user.reflinkfs.status"
XATTR_EXTENTS = "user.reflinkfs.extents"


def status(mnt) -> dict:
    return json.loads(os.getxattr(mnt, XATTR_STATUS))


def counters(mnt) -> dict:
    st = status(mnt)
    return {"bytes_read": st["data_file"]["bytes_read"], "bytes_written": st["data_file"]["bytes_written"],
            "bytes_served": st["cache"]["bytes_served"], "clones": st["clones"],
            "cloned_bytes": st["cloned_bytes"],
            "cfr_requests": st["extops"]["ops"].get("copy_file_range", {}).get("requests", 0),
            "saved_bytes": st["usage"]["saved_bytes"]}


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before}


def extents(path) -> dict:
    """A file's extent map from the virtual xattr, all pages joined."""
    info = json.loads(os.getxattr(path, XATTR_EXTENTS))
    page = info
    while page["next"]:
        page = json.loads(os.getxattr(path, page["next"]))
        info["extents"] += page["extents"]
    return info


def block_map(path) -> dict[int, tuple[int, int]]:
    """lblock -> (pblock, refcount) for every mapped block of a file."""
    out = {}
    for lb, pb, n, rc in extents(path)["extents"]:
        for i in range(n):
            out[lb + i] = (pb + i, rc)
    return out


def assert_shared(a, b, refcount: int = 2) -> None:
    """Every block of a and b maps the same physical block, each with this refcount, and no block of
    the file is missing (the partial last block included)."""
    ma, mb = block_map(a), block_map(b)
    size = os.stat(a).st_size
    assert os.stat(b).st_size == size
    assert sorted(ma) == list(range(-(-size // BS))), f"{a}: not every block is mapped: {extents(a)}"
    assert mb == ma, f"{b} does not share {a}'s blocks:\n{extents(a)}\n{extents(b)}"
    assert {rc for _, rc in ma.values()} <= {refcount}, f"refcounts of {a}: {extents(a)}"
