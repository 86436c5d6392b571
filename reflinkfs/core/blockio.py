"""Reading and writing physical blocks, with checksums, through a cache.

This is the one path between the volume and the data file. Reads verify every block against its
xxh3-64 checksum before it can reach a caller or a cache; a mismatch raises EIO naming the inode and the
byte offset in that file, never returns the wrong bytes. Writes go to the data file and then to the cache,
so the cache is coherent by construction.

`UncachedIO` is the base: no cache at all. The caches in `cache.py` subclass it and change where a
block's bytes come from, never how they are checked.
"""
from __future__ import annotations

import errno
import operator

from ..errors import FsError
from ..meta.schema import BLOCK_SIZE, unpack_sums
from ._sums import block_sums
from .datafile import DataFile
from .space import Space

BS = BLOCK_SIZE
assert BS == 4096, "_sums.c hashes 4096-byte blocks"


def checksums(data) -> bytes:
    """The packed xxh3-64 checksums of each block of data (see schema.pack_sums), in one C call: no
    Python loop per block (xxhash.xxh3_64_intdigest of each block gives the same values)."""
    return block_sums(data)


def verified(data, sums: list) -> list[bool]:
    """For each block of data: does it have a checksum (sums[i], None if not), and does it match?"""
    return list(map(operator.eq, unpack_sums(block_sums(memoryview(data)[:len(sums) * BS])), sums))


class UncachedIO:
    name = "none"

    def __init__(self, data: DataFile, space: Space, lookup):
        self.data = data
        self.space = space
        self.lookup = lookup          # lookup(ino, lstart, lend) -> [(lblock, pblock, nblocks)]
        self.bytes_served = 0

    # -- the data file, verified -------------------------------------------------------------
    def load(self, pblock: int, nblocks: int, ino: int, lblock: int) -> bytes:
        """Read physical blocks from the data file and verify each one's checksum."""
        buf = self.data.read(pblock, nblocks)
        sums = self.space.csums(pblock, nblocks)
        for i, ok in enumerate(verified(buf, sums)):
            if not ok:
                what = "has no checksum" if sums[i] is None else "checksum mismatch"
                raise FsError(errno.EIO, f"inode {ino}: data at byte offset {(lblock + i) * BS} is damaged "
                                         f"({what} at physical block {pblock + i})")
        return buf

    def read_mapped(self, ino: int, lstart: int, lend: int, load) -> list:
        """Buffers holding logical blocks [lstart, lend) of a file; `load(lblock, pblock, n)` reads
        each mapped piece; holes are zeros."""
        parts: list = []
        pos = lstart
        for lb, pb, n in self.lookup(ino, lstart, lend):
            if lb > pos:
                parts.append(bytes((lb - pos) * BS))
            parts.extend(load(lb, pb, n))
            pos = lb + n
        if pos < lend:
            parts.append(bytes((lend - pos) * BS))
        return parts

    # -- the interface the volume uses -------------------------------------------------------
    def read_blocks(self, ino: int, lstart: int, lend: int) -> list:
        """Buffers that together hold exactly logical blocks [lstart, lend) of a file."""
        parts = self.read_mapped(ino, lstart, lend, lambda lb, pb, n: [self.load(pb, n, ino, lb)])
        self.bytes_served += (lend - lstart) * BS
        return parts

    def write(self, ino: int, lblock: int, pblock: int, data) -> None:
        self.data.write(pblock, data)
        self.space.set_csums(pblock, checksums(data))

    def drop_phys(self, pblock: int, nblocks: int) -> None:
        """Physical blocks were released."""

    def drop_inode(self, ino: int, lblock: int, lend: int | None) -> None:
        """A file's mapping of [lblock, lend) changed (lend None = to the end)."""

    def close(self) -> None:
        """Stop what runs in the background (before the data file closes)."""

    def stats(self) -> dict:
        return {"mode": self.name, "bytes_served": self.bytes_served}
