"""The client side of the daemon's virtual extended attributes (names in xattrs.py): the statistics on a
mount's root, a file's extent map.
"""
from __future__ import annotations

import json
import os

from .errors import StoreError
from .mounts import reflinkfs_mounts
from .xattrs import EXTENTS as XATTR_EXTENTS
from .xattrs import STATUS as XATTR_STATUS

XATTR_SIZE_MAX = 65536
_libc = None       # loaded at first use: ctypes costs a command's start-up, and most commands need no libc call


def read_attribute(path, name: str) -> bytes:
    """One getxattr (of a path, or of an open descriptor) with the largest buffer the kernel allows, so
    the daemon computes the answer once (os.getxattr asks again with a bigger buffer when the first is
    too small)."""
    import ctypes
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)     # the libc the interpreter is linked with
    buf = ctypes.create_string_buffer(XATTR_SIZE_MAX)
    target: int | bytes
    if isinstance(path, int):
        f = _libc.fgetxattr
        f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
        target = path
    else:
        f = _libc.getxattr
        f.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
        target = os.fsencode(path)
    f.restype = ctypes.c_ssize_t
    n = f(target, name.encode(), buf, XATTR_SIZE_MAX)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), None if isinstance(path, int) else path)
    return buf.raw[:n]


def mount_root(path: str) -> str:
    """The reflinkfs mountpoint that holds path (StoreError if none)."""
    dev = os.stat(path).st_dev
    for mnt in reflinkfs_mounts():
        try:
            if os.stat(mnt).st_dev == dev:
                return mnt
        except OSError:
            continue
    raise StoreError(f"{path}: not inside a reflinkfs mount")


def status_of(mountpoint: str) -> dict:
    root = os.path.realpath(mountpoint)
    if root not in reflinkfs_mounts():
        raise StoreError(f"{mountpoint}: not a reflinkfs mount")
    return json.loads(os.getxattr(root, XATTR_STATUS))


def file_extents(path: str) -> dict:
    """A file's extent map as the mount reports it (all pages)."""
    mount_root(path)
    if not os.path.isfile(path):
        raise StoreError(f"{path}: not a regular file")
    info = json.loads(os.getxattr(path, XATTR_EXTENTS))
    page = info
    while page.get("next"):
        page = json.loads(os.getxattr(path, page["next"]))
        info["extents"] += page["extents"]
    info.pop("next", None)
    return info

