"""The C block checksums (reflinkfs.core._sums) against the xxhash package, block by block."""
import os

import pytest
import xxhash

from reflinkfs.core._sums import block_sums
from reflinkfs.core.blockio import checksums, verified
from reflinkfs.meta.schema import pack_sums, unpack_sums

BS = 4096


@pytest.mark.parametrize("nblocks", [0, 1, 2, 17, 256])
def test_block_sums_are_xxh3_64_of_each_block_packed_as_the_csums_table_stores_them(nblocks):
    data = os.urandom(nblocks * BS)
    want = [xxhash.xxh3_64_intdigest(data[i:i + BS]) for i in range(0, len(data), BS)]
    assert block_sums(data) == pack_sums(want)
    assert list(unpack_sums(checksums(data))) == want
    assert block_sums(memoryview(bytearray(data))) == pack_sums(want)      # any contiguous buffer


def test_a_partial_block_is_refused():
    with pytest.raises(ValueError, match="not a whole number"):
        block_sums(bytes(BS + 1))
    with pytest.raises(TypeError):
        block_sums("not a buffer")


def test_verified_says_which_blocks_match_their_checksum():
    data = bytearray(os.urandom(4 * BS))
    sums = list(unpack_sums(checksums(data)))
    sums[1] = None                               # no checksum: never verified
    sums[3] ^= 1                                 # wrong checksum
    data[2 * BS + 5] ^= 0xFF                     # damaged block
    assert verified(data, sums) == [True, False, False, False]
    assert verified(bytes(5 * BS), [xxhash.xxh3_64_intdigest(bytes(BS))] * 2) == [True, True]
