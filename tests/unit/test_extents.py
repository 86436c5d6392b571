"""Extent maps: lookup clips, unmap splits, map_run merges, the inode's block count follows."""
import sqlite3
import stat

import pytest
from hypothesis import given, settings, strategies as st

from reflinkfs.core import extents as ext
from reflinkfs.meta.schema import SCHEMA

INO = 7


@pytest.fixture
def db():
    d = _new_db()
    yield d
    d.close()


def _new_db() -> sqlite3.Connection:
    d = sqlite3.connect(":memory:", isolation_level=None)
    d.executescript(SCHEMA)
    d.execute("INSERT INTO inodes(ino, mode, uid, gid, nlink, atime_ns, mtime_ns, ctime_ns) "
              "VALUES (?, ?, 0, 0, 1, 0, 0, 0)", (INO, stat.S_IFREG | 0o644))
    return d


def _blocks(db) -> int:
    return db.execute("SELECT blocks FROM inodes WHERE ino=?", (INO,)).fetchone()[0]


def test_sequential_runs_merge_into_one_extent(db):
    ext.map_run(db, INO, 0, 100, 4)
    ext.map_run(db, INO, 4, 104, 4)
    assert ext.all_extents(db, INO) == [(0, 100, 8)]
    assert _blocks(db) == 8


def test_fill_a_gap_merges_both_neighbours(db):
    ext.map_run(db, INO, 0, 100, 2)
    ext.map_run(db, INO, 4, 104, 2)
    ext.map_run(db, INO, 2, 102, 2)
    assert ext.all_extents(db, INO) == [(0, 100, 6)]


def test_not_physically_contiguous_stays_apart(db):
    ext.map_run(db, INO, 0, 100, 2)
    ext.map_run(db, INO, 2, 50, 2)
    assert ext.all_extents(db, INO) == [(0, 100, 2), (2, 50, 2)]


def test_lookup_clips_to_range(db):
    ext.map_run(db, INO, 10, 100, 10)
    ext.map_run(db, INO, 30, 500, 5)
    assert ext.lookup(db, INO, 15, 32) == [(15, 105, 5), (30, 500, 2)]
    assert ext.lookup(db, INO, 20, 30) == []
    assert ext.lookup(db, INO, 5, 5) == []


def test_unmap_middle_splits_and_returns_removed(db):
    ext.map_run(db, INO, 0, 100, 10)
    removed = ext.unmap(db, INO, 3, 6)
    assert removed == [(3, 103, 3)]
    assert ext.all_extents(db, INO) == [(0, 100, 3), (6, 106, 4)]
    assert _blocks(db) == 7


def test_unmap_across_several_extents(db):
    ext.map_run(db, INO, 0, 100, 4)
    ext.map_run(db, INO, 6, 200, 4)
    ext.map_run(db, INO, 12, 300, 4)
    assert ext.unmap(db, INO, 2, 14) == [(2, 102, 2), (6, 200, 4), (12, 300, 2)]
    assert ext.all_extents(db, INO) == [(0, 100, 2), (14, 302, 2)]
    assert _blocks(db) == 4
    assert ext.unmap(db, INO, 4, 14) == []


maps = st.lists(st.tuples(st.booleans(), st.integers(0, 40), st.integers(1, 8), st.integers(0, 3)), max_size=40)


@settings(max_examples=200)
@given(maps)
def test_matches_dict_model(seq):
    db = _new_db()
    model: dict[int, int] = {}    # lblock -> pblock
    try:
        for is_map, lb, n, pbase in seq:
            if is_map:
                # map only into a hole, as the volume does; physical placement varies so some runs merge
                if any(b in model for b in range(lb, lb + n)):
                    continue
                pb = 1000 * pbase + lb
                ext.map_run(db, INO, lb, pb, n)
                model.update({lb + i: pb + i for i in range(n)})
            else:
                removed = ext.unmap(db, INO, lb, lb + n)
                want = {b: model.pop(b) for b in range(lb, lb + n) if b in model}
                assert {r[0] + i: r[1] + i for r in removed for i in range(r[2])} == want
            rows = ext.all_extents(db, INO)
            assert {lb_ + i: pb_ + i for lb_, pb_, n_ in rows for i in range(n_)} == model
            for (l0, p0, n0), (l1, p1, _) in zip(rows, rows[1:]):
                assert l0 + n0 <= l1, "overlapping extents"
                assert not (l0 + n0 == l1 and p0 + n0 == p1), f"mergeable extents left apart: {rows}"
            assert _blocks(db) == len(model)
            got = ext.lookup(db, INO, 5, 25)
            assert {l + i: p + i for l, p, m in got for i in range(m)} == \
                {b: p for b, p in model.items() if 5 <= b < 25}
    finally:
        db.close()
