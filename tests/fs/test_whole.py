"""Whole files: `Volume.wholeness` says a file is whole exactly when one segment holds its bytes at their
own offsets, the segment's file has the file's size, and nothing is in the segment where the file has a
hole; `usage()` counts whole files.

A file written from empty gets a segment of its own and each block its own offset there; clones,
rewrites, truncation and hole punching then go through the volume as usual.
"""
from __future__ import annotations

import os
import random

import pytest

from reflinkfs.check import fsck, fsck_db
from reflinkfs.core.volume import Volume
from reflinkfs.meta import schema

BS = 4096


def fsck_findings(v: Volume) -> list[str]:
    v.commit()
    return fsck_db(v.db, v.data.path, verify_data=True).findings


def rnd(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def laid_out(store):
    """a: 5 blocks and a bit, written sequentially (segment 1); s: sparse (blocks 0, 9 and 10, size 10
    blocks + 7), written at random offsets (segment 2); z: packed into segment 0 as a small file."""
    v = Volume.open(store)
    files = {"a": rnd(5 * BS + 100, 1), "z": rnd(3 * BS, 3)}
    ino = {name: v.create(1, name.encode(), 0o644, 0, 0).ino for name in ("a", "s", "z")}
    for off in range(0, len(files["a"]), 1000):  # sequential, in pieces that straddle blocks
        v.write(ino["a"], off, files["a"][off:off + 1000])
    v.small_file_bytes = 1 << 62
    v.write(ino["z"], 0, files["z"])
    v.small_file_bytes = 0
    v.write(ino["s"], 9 * BS, rnd(BS + 7, 4))     # written at random offsets: the end first
    v.write(ino["s"], 0, rnd(BS, 5))
    v.commit()
    v.close()
    v = Volume.open(store)
    yield v, ino
    v.close()
    assert fsck(store, verify_data=True).findings == []


def test_a_file_at_its_own_offsets_in_one_segment_of_its_size_is_whole(laid_out):
    v, ino = laid_out
    w = v.wholeness(ino["a"])
    assert (w.segment, w.whole, w.why) == (1, True, "")
    w = v.wholeness(ino["s"])                      # its hole is a hole of the segment too
    assert (w.segment, w.whole) == (2, True)
    w = v.wholeness(ino["z"])
    assert (w.segment, w.whole) == (0, False) and "segment 0" in w.why
    assert v.usage()["whole_files"] == 2 and v.usage()["whole_bytes"] == 5 * BS + 100 + 10 * BS + 7


def test_an_empty_file_is_not_whole(laid_out):
    v, _ = laid_out
    e = v.create(1, b"e", 0o644, 0, 0).ino
    assert v.wholeness(e).whole is False and v.wholeness(e).segment is None


def test_clones_are_whole_until_a_block_is_rewritten(laid_out):
    v, ino = laid_out
    b = v.create(1, b"b", 0o644, 0, 0).ino
    v.clone_file(ino["a"], b)
    assert v.wholeness(b).whole and v.wholeness(b).segment == 1
    assert v.usage()["whole_files"] == 3
    v.write(b, 2 * BS, rnd(BS, 9))                  # the rewritten block goes elsewhere (segment 0, for now)
    w = v.wholeness(b)
    assert not w.whole and w.segment is None and "2 segments" in w.why
    assert v.wholeness(ino["a"]).whole             # the sharer keeps its layout


def test_truncating_one_sharer_leaves_it_not_whole(laid_out):
    v, ino = laid_out
    b = v.create(1, b"b", 0o644, 0, 0).ino
    v.clone_file(ino["a"], b)
    v.truncate(b, 2 * BS)
    w = v.wholeness(b)
    assert not w.whole and w.segment == 1 and f"is {5 * BS + 100} bytes, the file {2 * BS}" in w.why
    assert v.wholeness(ino["a"]).whole


def test_a_hole_punched_in_a_shared_range_is_not_a_hole_of_the_segment(laid_out):
    v, ino = laid_out
    b = v.create(1, b"b", 0o644, 0, 0).ino
    v.clone_file(ino["a"], b)
    v.punch_hole(ino["a"], 2 * BS, BS)
    w = v.wholeness(ino["a"])
    assert not w.whole and "another file uses block 2" in w.why
    assert v.wholeness(b).whole


def test_data_in_the_segment_where_the_file_has_a_hole(laid_out, store):
    v, ino = laid_out
    with open(os.path.join(store, schema.SEGS_NAME, "2"), "r+b") as f:
        f.seek(4 * BS)
        f.write(b"x")
    w = v.wholeness(ino["s"])
    assert not w.whole and f"data at byte {4 * BS}" in w.why
    v.commit()
    assert fsck_findings(v) == ["segment 2: blocks 4-4 hold data but no file uses them (not punched; "
                                "the next mount punches them)"]
    path = os.path.join(store, schema.SEGS_NAME, "2")
    with open(path, "rb") as f:
        keep = f.read()
    with open(path, "wb") as f:                   # the hole again: only the blocks s uses are written
        f.truncate(len(keep))
        f.write(keep[:BS])
        f.seek(9 * BS)
        f.write(keep[9 * BS:])
    assert v.wholeness(ino["s"]).whole


def test_a_block_away_from_its_own_offset(laid_out):
    v, ino = laid_out
    c = v.create(1, b"c", 0o644, 0, 0).ino
    v.clone_range(ino["a"], 0, c, BS, 2 * BS)      # a's blocks 0-1 at c's blocks 1-2
    w = v.wholeness(c)
    assert not w.whole and w.segment == 1 and "logical block 1 is at block 0" in w.why


def test_fsck_checks_segment_sizes_and_identity_claims(laid_out, store):
    """The segment's file has the size the metadata gives it; an own segment is one file's, mapped at
    its own offsets, by it alone; a clone makes the segment nobody's own (frozen)."""
    v, ino = laid_out
    assert v.db.execute("SELECT own_seg FROM inodes WHERE ino=?", (ino["a"],)).fetchone() == (1,)
    b = v.create(1, b"b", 0o644, 0, 0).ino
    v.clone_file(ino["a"], b)
    assert v.db.execute("SELECT own_seg FROM inodes WHERE ino=?", (ino["a"],)).fetchone() == (0,)
    assert fsck_findings(v) == []
    v.db.execute("UPDATE inodes SET own_seg=1 WHERE ino=?", (ino["a"],))
    assert fsck_findings(v) == [f"segment 1: own segment of inode {ino['a']}, but inode {b} maps block 0 of it "
                                f"(a shared segment must be nobody's own)"]
    v.db.execute("UPDATE inodes SET own_seg=0 WHERE ino=?", (ino["a"],))
    v.db.execute("UPDATE inodes SET own_seg=2 WHERE ino=?", (ino["z"],))
    found = fsck_findings(v)
    assert f"segment 2: own segment of both inode {ino['s']} and inode {ino['z']}" in found
    v.db.execute("UPDATE inodes SET own_seg=0 WHERE ino=?", (ino["z"],))
    v.db.execute("UPDATE extents SET lblock=lblock+1 WHERE ino=? AND lblock=9", (ino["s"],))
    found = fsck_findings(v)
    assert f"inode {ino['s']}: logical block 10 is at block 9 of its own segment 2" in found
    v.db.execute("UPDATE extents SET lblock=lblock-1 WHERE ino=? AND lblock=10", (ino["s"],))
    os.truncate(os.path.join(store, schema.SEGS_NAME, "1"), 6 * BS)
    assert fsck_findings(v) == [f"segment 1: its file is {6 * BS} bytes, the metadata says {5 * BS + 100} "
                                f"(the next mount sets its size)"]
    os.truncate(os.path.join(store, schema.SEGS_NAME, "1"), 5 * BS + 100)


def seg_data(v: Volume, seg: int):
    """The data ranges (blocks) of a segment's file, or None when it has no file."""
    layout = v.data.segment_layout(seg)
    return None if layout is None else layout[1]


def test_freed_segment_blocks_are_punched_only_after_the_commit(laid_out):
    """A block of a segment that no file uses any more keeps its bytes until the commit that freed it is
    durable (the committed state still maps it), then is punched out; it never becomes a free run."""
    v, ino = laid_out
    v.commit()
    assert seg_data(v, 1) == [(0, 6)]
    v.truncate(ino["a"], 2 * BS)
    assert seg_data(v, 1) == [(0, 6)]               # not committed: the old state needs blocks 2-5
    v.commit()
    assert seg_data(v, 1) == [(0, 2)]
    assert v.db.execute("SELECT COUNT(*) FROM free WHERE pblock >= ?", (1 << 35,)).fetchone() == (0,)
    assert bytes(v.read(ino["a"], 0, 3 * BS)) == v.read(ino["a"], 0, 2 * BS)


def test_a_segment_nobody_uses_or_owns_is_removed_after_the_commit(laid_out, store):
    v, ino = laid_out
    path = os.path.join(store, schema.SEGS_NAME, "1")
    b = v.create(1, b"b", 0o644, 0, 0).ino
    v.clone_file(ino["a"], b)                      # a's segment is frozen: nobody's own
    v.unlink(1, b"a")
    v.commit()
    assert os.path.exists(path)                    # b still uses it
    v.unlink(1, b"b")
    assert os.path.exists(path)
    v.commit()
    assert not os.path.exists(path)
    assert v.db.execute("SELECT seg FROM segments").fetchall() == [(2,)]
    v.truncate(ino["s"], 0)                        # s owns segment 2: it stays, empty
    v.commit()
    assert v.db.execute("SELECT seg FROM segments").fetchall() == [(2,)] and seg_data(v, 2) == []


def test_opening_finishes_punches_and_deletions_a_crash_cut_short(laid_out, store):
    """A crash after the commit that freed segment blocks, before they were punched (or before a removed
    segment's file was deleted): fsck says so, and the next open finishes the job."""
    v, ino = laid_out
    v.data.release = lambda punch, gone: None        # the crash: the commit lands, the punches never run,
    v.data.set_size = lambda seg, nbytes, create=True: None   # nor the resizes
    v.truncate(ino["a"], 2 * BS)
    v.unlink(1, b"s")
    v.close()
    report = fsck(store)
    assert report.findings == [
        "segment file segs/2: no such segment in the metadata (the next mount deletes it)",
        f"segment 1: its file is {5 * BS + 100} bytes, the metadata says {2 * BS} (the next mount sets its size)",
        "segment 1: blocks 2-5 hold data but no file uses them (not punched; the next mount punches them)"]
    assert report.damage == []
    v = Volume.open(store)
    try:
        assert seg_data(v, 1) == [(0, 2)] and seg_data(v, 2) is None
    finally:
        v.close()
    assert fsck(store, verify_data=True).findings == []


def test_a_punch_that_fails_is_logged_and_retried_at_the_next_open(laid_out, store, monkeypatch, caplog):
    from reflinkfs.core import datafile

    def fail(fd, pos, nbytes):
        raise OSError(5, "Input/output error")
    v, ino = laid_out
    monkeypatch.setattr(datafile, "punch_hole", fail)
    v.punch_hole(ino["a"], 2 * BS, 2 * BS)
    v.commit()                                      # the commit stands; writes go on
    assert "cannot punch blocks" in caplog.text
    v.write(ino["z"], 0, b"still writable")
    v.commit()
    assert seg_data(v, 1) == [(0, 6)]
    monkeypatch.undo()
    v.close()
    v = Volume.open(store)
    try:
        assert seg_data(v, 1) == [(0, 2), (4, 6)]
    finally:
        v.close()
