"""Physical space: refcounted runs that split on partial overlap, and the allocator."""
import errno
import os

import pytest

from reflinkfs.core.space import CSUM_EXTEND, Space
from reflinkfs.meta.schema import CSUM_RUN, pack_sums, unpack_sums
from reflinkfs.errors import FsError
from reflinkfs.meta import schema
from reflinkfs.meta.schema import get_meta, mkfs


def _space(tmp_path, size_limit=0):
    store = str(tmp_path / "store")
    mkfs(store, size_limit=size_limit)
    db = schema.connect(os.path.join(store, schema.DB_NAME))
    released = []
    sp = Space(db, on_release=lambda pb, n: released.append((pb, n)))
    return sp, released


@pytest.fixture
def space(tmp_path):
    sp, released = _space(tmp_path)
    sp.released = released
    yield sp
    sp.db.close()


def refs(sp):
    return sp.db.execute("SELECT pblock, nblocks, refcount FROM refs ORDER BY pblock").fetchall()


def free(sp):
    return sp.db.execute("SELECT pblock, nblocks FROM free ORDER BY pblock").fetchall()


def commit(sp):
    sp.on_commit()
    sp.after_commit()


def test_alloc_grows_the_file_and_merges_refcount_one_runs(space):
    assert space.alloc(4) == [(0, 4)]
    assert space.alloc(3) == [(4, 3)]
    assert space.data_blocks == 7 and get_meta(space.db, "data_blocks") == 7
    assert refs(space) == [(0, 7, 1)]
    assert list(space.fresh) == [(0, 7)]


def test_incref_and_decref_split_runs(space):
    space.alloc(10)
    space.incref(3, 4)
    assert refs(space) == [(0, 3, 1), (3, 4, 2), (7, 3, 1)]
    assert space.refcounts(0, 10) == [(0, 3, 1), (3, 4, 2), (7, 3, 1)]
    assert space.refcount(5) == 2 and space.refcount(9) == 1 and space.refcount(10) == 0
    assert list(space.fresh) == [(0, 3), (7, 10)], "a shared block must no longer be overwritten in place"
    space.incref(5, 1)
    assert refs(space) == [(0, 3, 1), (3, 2, 2), (5, 1, 3), (6, 1, 2), (7, 3, 1)]
    space.decref(0, 10)
    assert refs(space) == [(3, 2, 1), (5, 1, 2), (6, 1, 1)]
    assert sorted(space.pending) == [(0, 3), (7, 3)]
    assert sorted(space.released) == [(0, 3), (7, 3)]
    assert list(space.fresh) == []


def csum_rows(sp):
    return [(p, n, list(unpack_sums(b))) for p, n, b in
            sp.db.execute("SELECT pblock, nblocks, sums FROM csums ORDER BY pblock")]


def test_decref_drops_checksums_of_released_blocks(space):
    space.alloc(3)
    space.set_csums(0, pack_sums([11, 12, 13]))
    space.decref(1, 1)
    assert space.csums(0, 3) == [11, None, 13]
    assert csum_rows(space) == [(0, 1, [11]), (2, 1, [13])]


def test_checksums_are_runs_cut_where_a_later_write_overlaps(space):
    space.alloc(20)
    space.set_csums(0, pack_sums(range(100, 110)))           # blocks 0-9: one row
    space.set_csums(10, pack_sums(range(200, 210)))          # blocks 10-19: continues it
    assert csum_rows(space) == [(0, 20, [*range(100, 110), *range(200, 210)])]
    space.set_csums(3, pack_sums([1, 2]))                     # inside: cuts it, continues the piece before
    assert csum_rows(space) == [(0, 5, [100, 101, 102, 1, 2]), (5, 15, [*range(105, 110), *range(200, 210)])]
    space.set_csums(8, pack_sums([7, 7, 7, 7]))               # across the old boundary of the two writes
    assert csum_rows(space) == [(0, 5, [100, 101, 102, 1, 2]), (5, 7, [105, 106, 107, 7, 7, 7, 7]),
                                (12, 8, list(range(202, 210)))]
    assert space.csums(2, 12) == [102, 1, 2, 105, 106, 107, 7, 7, 7, 7, 202, 203]
    space.clear_csums(0, 20)
    assert csum_rows(space) == [] and space.csums(0, 4) == [None] * 4
    space.set_csums(0, pack_sums(range(20)))
    space.clear_csums(5, 3)                                   # a hole in the middle of one run
    assert csum_rows(space) == [(0, 5, [0, 1, 2, 3, 4]), (8, 12, list(range(8, 20)))]
    assert space.csums(4, 5) == [4, None, None, None, 8]


def test_small_writes_that_continue_a_run_extend_it_up_to_csum_run_blocks(space):
    space.alloc(2 * CSUM_RUN)
    w = CSUM_EXTEND
    writes = CSUM_RUN // w + 1
    for k in range(writes):
        space.set_csums(k * w, pack_sums(range(k * w, (k + 1) * w)))
    assert [(p, n) for p, n, _ in csum_rows(space)] == [(0, CSUM_RUN), (CSUM_RUN, w)]
    assert space.csums(0, writes * w) == list(range(writes * w))
    space.set_csums(CSUM_RUN + 3 * w, pack_sums([5]))          # not continuing anything: a run of its own
    assert [(p, n) for p, n, _ in csum_rows(space)][-1] == (CSUM_RUN + 3 * w, 1)


def test_a_large_write_gets_a_checksum_run_of_its_own(space):
    space.alloc(4 * CSUM_EXTEND)
    space.set_csums(0, pack_sums([1] * 10))
    space.set_csums(10, pack_sums(range(CSUM_EXTEND + 1)))       # continues the run, but is large
    assert [(p, n) for p, n, _ in csum_rows(space)] == [(0, 10), (10, CSUM_EXTEND + 1)]
    assert space.csums(8, 4) == [1, 1, 0, 1]


def test_decref_of_unused_blocks_is_an_io_error(space):
    space.alloc(2)
    with pytest.raises(FsError) as e:
        space.decref(1, 4)
    assert e.value.errno == errno.EIO and "fsck" in e.value.message


def test_alloc_prefers_smallest_contiguous_free_run(space):
    space.alloc(30)
    space.decref(0, 2)
    space.decref(4, 5)
    space.decref(12, 8)
    commit(space)
    assert free(space) == [(0, 2), (4, 5), (12, 8)]
    assert space.alloc(5) == [(4, 5)]          # exact fit, though a bigger run comes first by size order
    assert space.alloc(6) == [(12, 6)]         # smallest run that fits, not the first or the largest
    assert free(space) == [(0, 2), (18, 2)]
    # no free run fits 3 and the file may grow: grow rather than scatter the new data
    assert space.alloc(3) == [(30, 3)]


def test_freed_blocks_are_reused_only_after_commit(space):
    assert space.alloc(4) == [(0, 4)]
    commit(space)
    space.decref(0, 4)
    assert space.pending == [(0, 4)]
    assert space.alloc(4) == [(4, 4)], "blocks released in the open transaction were handed out again"
    assert free(space) == []
    commit(space)
    assert space.pending == [] and free(space) == [(0, 4)]
    assert space.alloc(4) == [(0, 4)]


def test_free_run_at_the_end_extends_into_growth(space):
    space.alloc(10)
    space.decref(6, 4)
    commit(space)
    assert space.alloc(6) == [(6, 6)]
    assert space.data_blocks == 12 and free(space) == []


def test_rollback_forgets_releases_and_growth(space):
    space.alloc(4)
    commit(space)
    space.db.execute("BEGIN")
    mark = len(space.pending)
    space.decref(0, 4)
    space.alloc(8)
    space.db.execute("ROLLBACK")
    space.rollback_to(mark)
    assert space.pending == [] and space.data_blocks == 4
    assert refs(space) == [(0, 4, 1)]


def test_enospc_at_the_size_limit(tmp_path):
    sp, _ = _space(tmp_path, size_limit=16 * 4096)
    try:
        assert sp.limit_blocks == 16 and sp.room_to_grow() == 16
        assert sp.alloc(16) == [(0, 16)]
        with pytest.raises(FsError) as e:
            sp.alloc(1)
        assert e.value.errno == errno.ENOSPC
        sp.decref(2, 2)
        sp.decref(8, 3)
        with pytest.raises(FsError) as e:      # released but not committed: still not free
            sp.alloc(1)
        assert e.value.errno == errno.ENOSPC
        commit(sp)
        with pytest.raises(FsError) as e:
            sp.alloc(6)
        assert e.value.errno == errno.ENOSPC
        assert free(sp) == [(2, 2), (8, 3)], "a failed allocation took space"
        # no single run fits 5 and the file cannot grow: gather the smaller runs
        assert sorted(sp.alloc(5)) == [(2, 2), (8, 3)]
        assert free(sp) == [] and sp.data_blocks == 16
    finally:
        sp.db.close()


def test_gather_uses_growth_room_before_free_runs(tmp_path):
    sp, _ = _space(tmp_path, size_limit=16 * 4096)
    try:
        sp.alloc(12)
        sp.decref(0, 1)
        sp.decref(4, 2)
        commit(sp)
        runs = sorted(sp.alloc(6))        # 4 blocks of growth room + 2 from free runs
        assert sum(n for _, n in runs) == 6
        assert (12, 4) in runs
        assert sp.data_blocks == 16
        assert sum(n for _, n in free(sp)) == 1
    finally:
        sp.db.close()
