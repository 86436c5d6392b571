"""A 1 GiB clone moves no data and costs metadata proportional to extents, not bytes."""
import os

from reflinkfs.core.volume import Volume

BS = 4096
GIB = 1 << 30
CHUNK = 64 << 20


def test_clone_of_1_gib_moves_no_data(vol: Volume):
    src = vol.create(1, b"big", 0o644, 0, 0).ino
    pattern = os.urandom(1 << 20) * (CHUNK >> 20)
    for off in range(0, GIB, CHUNK):
        vol.write(src, off, pattern)
    # a few rewritten spots (after a commit, so copy-on-write) give the file several extents
    vol.commit()
    for i in range(1, 8):
        vol.write(src, i * (GIB // 8) + 123, b"extent boundary %d" % i)
    vol.commit()
    extents = len(vol.extent_map(src))
    assert 8 <= extents <= 40
    dst = vol.create(1, b"copy", 0o644, 0, 0).ino

    before = vol.data.stats()
    changes = vol.db.total_changes
    assert vol.clone_range(src, 0, dst, 0, GIB) == GIB
    after = vol.data.stats()
    rows_changed = vol.db.total_changes - changes

    assert (after.bytes_read, after.bytes_written) == (before.bytes_read, before.bytes_written)
    assert after.reads == before.reads and after.writes == before.writes
    # every extent record is copied and every refs run touched: a handful of rows per extent, where a
    # per-block cost would be 262144
    assert rows_changed <= 10 * extents + 10, rows_changed
    assert vol.getattr(dst).size == GIB
    assert vol.extent_map(dst) == [(lb, pb, n, 2) for lb, pb, n, _ in vol.extent_map(src)]
    assert vol.usage()["saved_bytes"] == GIB
    # the clone is a real copy: spot checks on both sides of the rewritten extents
    for i in range(1, 8):
        off = i * (GIB // 8)
        assert bytes(vol.read(dst, off, 200)) == bytes(vol.read(src, off, 200))
    vol.write(dst, GIB // 2, b"only in the copy")
    assert bytes(vol.read(src, GIB // 2, 16)) == pattern[:16]
    # fsck (with data verification) runs at teardown
