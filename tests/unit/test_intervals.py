"""IntervalSet against a plain Python set of integers."""
from hypothesis import given, settings, strategies as st

from reflinkfs.core.intervals import IntervalSet

ops = st.lists(st.tuples(st.sampled_from(["add", "remove"]), st.integers(0, 60), st.integers(0, 20)),
               max_size=40)


def _check_shape(s: IntervalSet) -> None:
    runs = list(s)
    for a, b in runs:
        assert a < b, runs
    for (a0, b0), (a1, b1) in zip(runs, runs[1:]):
        assert b0 < a1, f"intervals not sorted, or touching and not coalesced: {runs}"


@settings(max_examples=300)
@given(ops, st.integers(0, 80), st.integers(0, 30))
def test_matches_set_model(seq, q_start, q_len):
    s, model = IntervalSet(), set()
    for op, start, length in seq:
        if op == "add":
            s.add(start, start + length)
            model |= set(range(start, start + length))
        else:
            s.remove(start, start + length)
            model -= set(range(start, start + length))
        _check_shape(s)
        assert {x for a, b in s for x in range(a, b)} == model
        assert len(s) == len(list(s))
    # pieces() splits a query range exactly into inside/outside pieces
    q_end = q_start + q_len
    pieces = list(s.pieces(q_start, q_end))
    pos = q_start
    for a, b, inside in pieces:
        assert a == pos and a < b
        assert all((x in model) == inside for x in range(a, b))
        pos = b
    assert pos == q_end if q_len else pieces == []
    # consecutive pieces alternate (a piece is maximal)
    assert all(p[2] != q[2] for p, q in zip(pieces, pieces[1:]))


def test_add_coalesces_touching_and_remove_splits():
    s = IntervalSet()
    s.add(0, 5)
    s.add(5, 10)
    s.add(20, 30)
    assert list(s) == [(0, 10), (20, 30)]
    s.remove(3, 25)
    assert list(s) == [(0, 3), (25, 30)]
    s.add(1, 2)
    s.add(10, 10)        # empty: no effect
    assert list(s) == [(0, 3), (25, 30)]
    s.clear()
    assert list(s) == [] and len(s) == 0
