"""fsck: corrupt a closed store's metadata (or data) directly, and check each damage is found and,
where it can be, repaired so that the store is clean again."""
from __future__ import annotations

import errno
import os
import random
import sqlite3
import stat

import pytest

from reflinkfs.check import fsck
from reflinkfs.cli import main
from reflinkfs.core.space import Space
from reflinkfs.core.volume import Volume
from reflinkfs.errors import FsError
from reflinkfs.meta import schema
from reflinkfs.meta.schema import DB_NAME, pack_sums

BS = 4096

pytestmark = pytest.mark.damages_store   # each test makes its own assertions about fsck


def rnd(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def pop(store):
    """A store with: a (3 blocks), b (clone of a), c (2 blocks, then 1 more), d/e (1 block), hard link d/a;
    all in segment 0 (packed as small files are), where these tests damage the metadata by hand."""
    v = Volume.open(store)
    v.small_file_bytes = 1 << 62
    info = {"store": store}
    a = v.create(1, b"a", 0o644, 0, 0).ino
    v.write(a, 0, rnd(3 * BS, 1))
    b = v.create(1, b"b", 0o644, 0, 0).ino
    v.clone_range(a, 0, b, 0, 3 * BS)
    c = v.create(1, b"c", 0o644, 0, 0).ino
    v.write(c, 0, rnd(2 * BS, 2))
    d = v.mkdir(1, b"d", 0o755, 0, 0).ino
    e = v.create(d, b"e", 0o644, 0, 0).ino
    v.write(e, 0, rnd(BS, 3))
    v.link(a, d, b"a")
    v.commit()
    v.write(c, 2 * BS, rnd(BS, 4))
    info.update(a=a, b=b, c=c, d=d, e=e, maps={i: v.extent_map(i) for i in (a, b, c, e)},
                data_blocks=v.space.data_blocks)
    v.close()
    assert fsck(store, verify_data=True).findings == []
    return info


def sql(store: str, statement: str, params=()) -> None:
    db = sqlite3.connect(os.path.join(store, DB_NAME))
    db.execute(statement, params)
    db.commit()
    db.close()


def query(store: str, statement: str, params=()):
    db = sqlite3.connect(os.path.join(store, DB_NAME))
    try:
        return db.execute(statement, params).fetchall()
    finally:
        db.close()


def repair_and_recheck(store: str):
    rep = fsck(store, repair_=True)
    assert rep.repaired, "nothing was repaired"
    after = fsck(store, verify_data=True)
    return rep, after


def files_still_read(store: str, info: dict, skip=()) -> None:
    v = Volume.open(store)
    try:
        for name, ino, data in [(b"a", info["a"], rnd(3 * BS, 1)), (b"b", info["b"], rnd(3 * BS, 1)),
                                (b"c", info["c"], rnd(2 * BS, 2) + rnd(BS, 4))]:
            if name not in skip:
                assert bytes(v.read(ino, 0, 10 * BS)) == data
    finally:
        v.close()


def test_wrong_refcount(pop):
    s = pop["store"]
    _, pb, n, rc = pop["maps"][pop["a"]][0]
    assert rc == 2
    sql(s, "UPDATE refs SET refcount=3 WHERE pblock=?", (pb,))
    findings = fsck(s).findings
    assert f"refcount: physical blocks {pb}-{pb + n - 1} have refcount 3, but 2 extent(s) use them" in findings
    rep, after = repair_and_recheck(s)
    assert "rebuilt refcounts and free space from the extent maps" in rep.repaired
    assert after.findings == [] and rep.unrepairable == []
    files_still_read(s, pop)


def test_leaked_refs_run(pop):
    s = pop["store"]
    top = pop["data_blocks"]
    os.truncate(os.path.join(s, "data"), top * 4096)   # the data file is grown ahead of use; cut it back
    sql(s, "UPDATE meta SET value=? WHERE key='data_blocks'", (top + 2,))
    sql(s, "INSERT INTO refs(pblock, nblocks, refcount) VALUES (?, 2, 1)", (top,))
    findings = fsck(s).findings
    assert f"refcount: physical blocks {top}-{top + 1} have refcount 1 but no extent uses them (leaked)" in findings
    assert any(f.startswith(f"checksum: used physical blocks {top}-{top + 1} have no checksum") for f in findings)
    assert f"data file: holds {top} blocks but the metadata uses {top + 2}" in findings
    rep = fsck(s, repair_=True)
    assert "rebuilt refcounts and free space from the extent maps" in rep.repaired
    after = fsck(s)
    # the leak is repaired; the data file stays shorter than the high-water mark until the next mount
    assert not any("refcount" in f or "checksum" in f for f in after.findings)
    Volume.open(s).close()    # opening grows the data file to the recorded size
    assert fsck(s, verify_data=True).findings == []


def test_extent_beyond_the_data_file(pop):
    s = pop["store"]
    c, top = pop["c"], pop["data_blocks"]
    sql(s, "DELETE FROM extents WHERE ino=? AND lblock>=2", (c,))
    sql(s, "INSERT INTO extents(ino, lblock, pblock, nblocks) VALUES (?, 2, ?, 1)", (c, top + 100))
    findings = fsck(s).findings
    assert (f"extent: inode {c} maps logical block 2 to physical {top + 100}+1, beyond the data file "
            f"({top} blocks)") in findings
    assert f"refcount: physical blocks {top + 100}-{top + 100} are used by 1 extent(s) but not marked in use" \
        in findings
    rep, after = repair_and_recheck(s)
    assert any(f"inode {c}: data at byte offset {2 * BS}" in u and "is lost" in u for u in rep.unrepairable)
    assert after.findings == []
    v = Volume.open(s)
    try:
        assert bytes(v.read(c, 0, 3 * BS)) == rnd(2 * BS, 2) + bytes(BS)   # the lost block is now a hole
    finally:
        v.close()


def test_block_both_free_and_used(pop):
    s = pop["store"]
    _, pb, _, _ = pop["maps"][pop["c"]][0]
    free_before = query(s, "SELECT pblock, nblocks FROM free")
    sql(s, "INSERT INTO free(pblock, nblocks) VALUES (?, 1)", (pb,))
    findings = fsck(s).findings
    assert f"space: physical blocks {pb}-{pb} are both free and in use" in findings
    rep, after = repair_and_recheck(s)
    assert after.findings == []
    assert query(s, "SELECT pblock, nblocks FROM free") == free_before
    files_still_read(s, pop)


def test_block_used_twice_with_refcount_one(pop):
    s = pop["store"]
    e = pop["e"]
    _, pb, _, rc = pop["maps"][pop["c"]][0]
    assert rc == 1
    # e's only block now points at c's first block too: two users, refcount still 1
    sql(s, "UPDATE extents SET pblock=? WHERE ino=?", (pb, e))
    findings = fsck(s).findings
    assert f"refcount: physical blocks {pb}-{pb} have refcount 1, but 2 extent(s) use them" in findings
    [old_e_pb] = [p for _, p, _, _ in pop["maps"][e]]
    assert f"refcount: physical blocks {old_e_pb}-{old_e_pb} have refcount 1 but no extent uses them (leaked)" \
        in findings
    rep, after = repair_and_recheck(s)
    assert after.findings == []
    # the doubly-used block is now properly shared: writing through one file leaves the other intact
    v = Volume.open(s)
    try:
        assert [rc for *_, rc in v.extent_map(e)] == [2]
        v.write(e, 0, b"e changes")
        assert bytes(v.read(pop["c"], 0, 2 * BS)) == rnd(2 * BS, 2)
    finally:
        v.close()
    assert fsck(s, verify_data=True).findings == []


def test_free_space_hole(pop):
    s = pop["store"]
    v = Volume.open(s)
    v.unlink(1, b"c")
    v.close()
    free_runs = query(s, "SELECT pblock, nblocks FROM free ORDER BY pblock")
    fp, fn = free_runs[0]
    sql(s, "DELETE FROM free WHERE pblock=?", (fp,))
    assert f"space: physical blocks {fp}-{fp + fn - 1} are neither free nor in use" in fsck(s).findings
    rep, after = repair_and_recheck(s)
    assert after.findings == [] and query(s, "SELECT pblock, nblocks FROM free ORDER BY pblock") == free_runs


def test_wrong_nlink(pop):
    s = pop["store"]
    a, d, c = pop["a"], pop["d"], pop["c"]
    sql(s, "UPDATE inodes SET nlink=5 WHERE ino=?", (a,))
    sql(s, "UPDATE inodes SET nlink=2 WHERE ino=1")
    sql(s, "UPDATE inodes SET nlink=3 WHERE ino=?", (c,))
    findings = fsck(s).findings
    assert f"inode {a}: nlink is 5, should be 2" in findings
    assert "inode 1: nlink is 2, should be 3" in findings
    assert f"inode {c}: nlink is 3, should be 1" in findings
    rep, after = repair_and_recheck(s)
    assert "corrected nlink of 3 inode(s)" in rep.repaired
    assert after.findings == []
    v = Volume.open(s)
    try:
        assert v.getattr(a).nlink == 2 and v.getattr(1).nlink == 3 and v.getattr(d).nlink == 2
    finally:
        v.close()


def test_orphan_inode_without_entry_goes_to_lost_found(pop):
    s = pop["store"]
    c = pop["c"]
    sql(s, "DELETE FROM dirents WHERE ino=?", (c,))
    findings = fsck(s).findings
    assert f"orphan: inode {c} has no directory entry" in findings
    rep, after = repair_and_recheck(s)
    assert "moved 1 unreachable inode(s) to /lost+found" in rep.repaired
    assert after.findings == []
    v = Volume.open(s)
    try:
        lf = v.lookup(1, b"lost+found")
        assert stat.S_ISDIR(lf.mode)
        assert v.lookup(lf.ino, f"#{c}".encode()).ino == c
        assert bytes(v.read(c, 0, 10 * BS)) == rnd(2 * BS, 2) + rnd(BS, 4)
    finally:
        v.close()


def test_orphan_unlinked_inode_is_freed(pop):
    s = pop["store"]
    c = pop["c"]
    sql(s, "DELETE FROM dirents WHERE ino=?", (c,))
    sql(s, "UPDATE inodes SET nlink=0 WHERE ino=?", (c,))
    findings = fsck(s).findings
    assert f"orphan: inode {c} was unlinked while open and is still allocated (freed at next mount)" in findings
    rep, after = repair_and_recheck(s)
    assert "freed 1 unlinked inode(s)" in rep.repaired
    assert after.findings == []
    assert query(s, "SELECT COUNT(*) FROM inodes WHERE ino=?", (c,)) == [(0,)]
    assert query(s, "SELECT SUM(nblocks) FROM free") == [(3,)]
    files_still_read(s, pop, skip=(b"c",))


def test_entry_pointing_at_missing_inode(pop):
    s = pop["store"]
    sql(s, "INSERT INTO dirents(parent, name, ino) VALUES (1, ?, 9999)", (b"ghost",))
    assert "entry: b'ghost' in directory 1 points at missing inode 9999" in fsck(s).findings
    rep, after = repair_and_recheck(s)
    assert "removed 1 directory entries pointing at missing inodes" in rep.repaired
    assert after.findings == []


def test_wrong_block_count(pop):
    s = pop["store"]
    c = pop["c"]
    sql(s, "UPDATE inodes SET blocks=99 WHERE ino=?", (c,))
    assert f"inode {c}: block count 99, but its extents map 3" in fsck(s).findings
    # block counts are rebuilt silently with the rest of the derived state; the store ends clean
    fsck(s, repair_=True)
    assert fsck(s, verify_data=True).findings == []
    assert query(s, "SELECT blocks FROM inodes WHERE ino=?", (c,)) == [(3,)]


def test_missing_checksum_is_reported_unrepairable(pop):
    s = pop["store"]
    c = pop["c"]
    _, pb, _, _ = pop["maps"][c][0]
    db = schema.connect(os.path.join(s, DB_NAME))
    db.execute("BEGIN")
    Space(db).clear_csums(pb + 1, 1)
    db.execute("COMMIT")
    db.close()
    finding = f"checksum: used physical blocks {pb + 1}-{pb + 1} have no checksum"
    assert finding in fsck(s).findings
    rep = fsck(s, repair_=True)
    assert any(u.startswith(finding) and "cannot be verified" in u for u in rep.unrepairable)
    # still found, still reported: nothing pretends to be fixed; everything else is clean
    assert fsck(s).findings == [finding]
    assert main(["fsck", "--repair", s]) == 1
    v = Volume.open(s)
    try:
        with pytest.raises(FsError) as e:
            v.read(c, BS, 10)
        assert e.value.errno == errno.EIO and f"inode {c}" in e.value.message and "no checksum" in e.value.message
        assert bytes(v.read(c, 0, 10)) == rnd(2 * BS, 2)[:10]     # the other blocks still read
    finally:
        v.close()


def test_damaged_data_found_by_verify_data(pop):
    s = pop["store"]
    c = pop["c"]
    _, pb, _, _ = pop["maps"][c][0]
    with open(os.path.join(s, "data"), "r+b") as f:
        f.seek((pb + 1) * BS + 7)
        f.write(b"\xde\xad")
    assert fsck(s).findings == [], "without --verify-data the bytes are not read"
    findings = fsck(s, verify_data=True).findings
    assert findings == [f"data: physical block {pb + 1} does not match its checksum (inode {c} offset {BS})"]


def test_nonzero_bytes_past_eof_found_by_verify_data(pop):
    s = pop["store"]
    c = pop["c"]
    sql(s, "UPDATE inodes SET size=? WHERE ino=?", (2 * BS + 100, c))
    assert fsck(s).findings == []
    findings = fsck(s, verify_data=True).findings
    assert len(findings) == 1
    assert findings[0].startswith(f"data: inode {c} has non-zero bytes past its size {2 * BS + 100} "
                                  f"(logical block 2,")


def test_cli_repair_then_clean(pop, capsys):
    s = pop["store"]
    sql(s, "UPDATE refs SET refcount=refcount+5")
    sql(s, "UPDATE inodes SET nlink=7 WHERE ino=?", (pop["e"],))
    assert main(["fsck", s]) == 1
    out = capsys.readouterr().out
    assert f"inode {pop['e']}: nlink is 7, should be 1" in out and "refcount" in out
    assert main(["fsck", "--repair", s]) == 0
    out = capsys.readouterr().out
    assert "repaired: rebuilt refcounts" in out and "repaired: corrected nlink" in out
    assert main(["fsck", "--verify-data", s]) == 0


def test_checksums_of_freed_blocks_and_overlapping_runs_are_repaired(pop):
    s = pop["store"]
    top = pop["data_blocks"]
    _, pb_c, _, _ = pop["maps"][pop["c"]][0]
    os.truncate(os.path.join(s, "data"), (top + 4) * BS)
    sql(s, "UPDATE meta SET value=? WHERE key='data_blocks'", (top + 4,))
    sql(s, "UPDATE free SET nblocks = nblocks + 4 WHERE pblock + nblocks = ?", (top,))
    if not query(s, "SELECT 1 FROM free WHERE pblock + nblocks = ?", (top + 4,)):
        sql(s, "INSERT INTO free(pblock, nblocks) VALUES (?, 4)", (top,))
    # a checksum run over free blocks, and a second run overlapping c's first block
    sql(s, "INSERT INTO csums(pblock, nblocks, sums) VALUES (?, 4, ?)", (top, pack_sums([1, 2, 3, 4])))
    old = query(s, "SELECT pblock, nblocks, sums FROM csums WHERE pblock <= ? ORDER BY pblock DESC LIMIT 1",
                (pb_c,))[0]
    findings = fsck(s).findings
    assert f"checksum: free physical blocks {top}-{top + 3} still have checksums" in findings
    sql(s, "INSERT INTO csums(pblock, nblocks, sums) VALUES (?, 2, ?)", (old[0] - 1, pack_sums([0, 0])))
    assert any("overlap" in f for f in fsck(s).findings)
    rep, after = repair_and_recheck(s)
    # 4 of free blocks, 2 of the overlapping run (its block before c's run had no checksum to keep:
    # it is free; c's first block keeps the sum that matches its bytes)
    assert "dropped 6 checksums of free blocks or of blocks two runs claimed" in rep.repaired, rep.repaired
    assert after.findings == [], after.findings
    files_still_read(s, pop)


def test_malformed_checksum_run_is_reported(pop):
    s = pop["store"]
    p = query(s, "SELECT pblock FROM csums ORDER BY pblock LIMIT 1")[0][0]
    sql(s, "UPDATE csums SET sums = substr(sums, 1, 4) WHERE pblock=?", (p,))
    assert any(f.startswith(f"checksum: the run at physical block {p} is malformed") for f in fsck(s).findings)


def test_fsck_finds_segment_damage(pop):
    """A stray segment file, a listed segment whose file is gone, an own segment that does not exist,
    an extent in a segment that does not exist, one past its segment's size, a free run outside
    segment 0: each is found."""
    from reflinkfs.core.datafile import seg_base
    s = pop["store"]
    folder = os.path.join(s, schema.SEGS_NAME)
    open(os.path.join(folder, "5"), "wb").close()
    sql(s, "INSERT INTO segments(seg, size_bytes) VALUES (2, ?)", (3 * BS,))
    sql(s, "UPDATE meta SET value=9 WHERE key='next_seg'")
    sql(s, "UPDATE inodes SET own_seg=4 WHERE ino=?", (pop["e"],))
    sql(s, "UPDATE extents SET pblock=? WHERE ino=?", (seg_base(3), pop["e"]))
    sql(s, "INSERT INTO free(pblock, nblocks) VALUES (?, 1)", (seg_base(2) + 7,))
    found = "\n".join(fsck(s).findings)
    assert "segs/5: no such segment" in found
    assert "segment 2: its file segs/2 is missing" in found
    assert f"inode {pop['e']}: its own segment 4 does not exist" in found
    assert f"extents: run {seg_base(3)}+1 lies in segment 3, which does not exist" in found
    assert "lies in segment 2; free runs are in segment 0 only" in found
    open(os.path.join(folder, "2"), "wb").close()
    sql(s, "UPDATE extents SET pblock=? WHERE ino=?", (seg_base(2) + 2, pop["e"]))
    found = "\n".join(fsck(s).findings)
    assert "segment 2: its file segs/2 is missing" not in found
    assert f"extents: run {seg_base(2) + 2}+1 lies in segment 2" not in found
    sql(s, "UPDATE extents SET pblock=? WHERE ino=?", (seg_base(2) + 3, pop["e"]))
    assert f"extents: run {seg_base(2) + 3}+1 reaches past the size of segment 2" in "\n".join(fsck(s).findings)


def test_fsck_verify_data_reads_blocks_through_their_segment(pop):
    """--verify-data reads a block of segment s from segs/<s>: damage there is found, and a block whose
    bytes are right there verifies."""
    import xxhash
    from reflinkfs.core.datafile import seg_base
    s = pop["store"]
    blk = rnd(BS, 9)
    with open(os.path.join(s, schema.SEGS_NAME, "1"), "wb") as f:
        f.seek(BS)                                   # block 0 is a hole: nothing uses it
        f.write(blk)
    sql(s, "INSERT INTO segments(seg, size_bytes) VALUES (1, ?)", (2 * BS,))
    sql(s, "UPDATE meta SET value=2 WHERE key='next_seg'")
    sql(s, "UPDATE extents SET pblock=? WHERE ino=?", (seg_base(1) + 1, pop["e"]))
    sql(s, "INSERT INTO refs(pblock, nblocks, refcount) VALUES (?, 1, 1)", (seg_base(1) + 1,))
    sql(s, "INSERT INTO csums(pblock, nblocks, sums) VALUES (?, 1, ?)",
        (seg_base(1) + 1, pack_sums([xxhash.xxh3_64_intdigest(blk)])))
    # (e's old block in segment 0 is leaked now; that is all fsck should say)
    assert [f for f in fsck(s, verify_data=True).findings if "(leaked)" not in f] == []
    v = Volume.open(s)
    try:
        assert bytes(v.read(pop["e"], 0, BS)) == blk
    finally:
        v.close()
    with open(os.path.join(s, schema.SEGS_NAME, "1"), "r+b") as f:
        f.seek(BS + 10)
        f.write(b"X")
    assert any(f"physical block {seg_base(1) + 1} does not match" in f for f in fsck(s, verify_data=True).findings)
