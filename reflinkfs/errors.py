"""Errors of the core.

`FsError` carries an errno: the core raises it for everything a filesystem caller can cause (ENOENT,
ENOSPC, EIO for a damaged block, ...). The FUSE adapter turns it into `pyfuse3.FUSEError` at the boundary;
the CLI prints its message on one line.

`StoreError` is a store that cannot be opened or created at all (missing, damaged, unknown version): it
always carries a one-line message naming the path and what to do.
"""
import errno
import os


class FsError(OSError):
    def __init__(self, err: int, message: str | None = None):
        super().__init__(err, message or os.strerror(err))

    @property
    def message(self) -> str:
        return self.strerror or ""


class StoreError(Exception):
    """The store cannot be used; str(e) is a one-line message for the user."""


def enoent(what: str = "") -> FsError:
    return FsError(errno.ENOENT, f"no such file or directory{': ' + what if what else ''}")
