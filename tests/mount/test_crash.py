"""Crash consistency: SIGKILL the daemon in the middle of a random workload, fsck, remount, check.

The harness is scripts/crash_harness.py (run it by hand with `--rounds N` for more). Its checker is pure
and tested first, here, against recoveries that are wrong in each way it must notice: a test that can
only pass proves nothing.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from mountutil import is_mounted, need_fuse

ROOT = Path(__file__).resolve().parents[2]


def _load_harness():
    name = "crash_harness"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "crash_harness.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


H = _load_harness()
BS = H.BS


def L(*ops, inflight_last: bool = False, t: float = 100.0):
    """A parsed log of completed operations (the last one unanswered if inflight_last), 0.1 s apart."""
    out = []
    for i, op in enumerate(ops):
        o = H.LoggedOp(i + 1, op, t + i * 0.1, t + i * 0.1 + 0.05, "done")
        out.append(o)
    if inflight_last:
        out[-1].status, out[-1].t1 = "inflight", None
    return out


def W(path, off, n, wid):
    return {"op": "write", "path": path, "off": off, "len": n, "id": wid}


def FS(path):
    return {"op": "fsync", "path": path}


def states_of(baseline, log):
    """Every state the model goes through (the baseline first)."""
    out = [baseline]
    for o in log:
        out += H.op_steps(out[-1], o.op)
    return out


# -- the contents and the model ---------------------------------------------------------------------
def test_patterns_name_their_write_and_block():
    data = H.pattern(7, 3 * BS + 100, 2 * BS)
    assert len(data) == 2 * BS
    assert data[:BS - 100] == H.block_pattern(7, 3)[100:]
    assert H.describe_block(H.block_pattern(7, 3)) == "write 7 block 3 at byte 0"
    assert H.describe_block(bytes(BS)) == "zeros"
    assert "unrecognised" in H.describe_block(b"\x01" * BS)
    damaged = bytearray(H.block_pattern(9, 1))
    damaged[2000] ^= 1
    assert "body damaged" in H.describe_block(bytes(damaged))
    assert H.block_pattern(7, 3) != H.block_pattern(7, 4) != H.block_pattern(8, 3)


def test_model_steps():
    s0 = {"a": b"x" * 10}
    (s,) = H.op_steps(s0, W("a", 20, 5, 1))                   # past EOF: the gap reads as zeros
    assert s["a"] == b"x" * 10 + bytes(10) + H.pattern(1, 20, 5)
    create, written = H.op_steps(s0, W("b", 0, 3, 2))          # a new file is created, then written
    assert create["b"] == b"" and written["b"] == H.pattern(2, 0, 3)
    (s,) = H.op_steps(s0, {"op": "cfr", "src": "a", "dst": "a2", "soff": 4, "doff": 2, "len": 100})[1:]
    assert s["a2"] == bytes(2) + b"x" * 6                        # clipped at the source's EOF
    empty, full = H.op_steps(s0, {"op": "cp", "src": "a", "dst": "c"})
    assert empty["c"] == b"" and full["c"] == s0["a"]
    (s,) = H.op_steps(s0, {"op": "rename", "src": "a", "dst": "z"})
    assert s == {"z": b"x" * 10}
    (s,) = H.op_steps(s0, {"op": "truncate", "path": "a", "size": 12})
    assert s["a"] == b"x" * 10 + bytes(2)
    assert H.op_steps(s0, FS("a")) == []
    with pytest.raises(H.ModelError):
        H.op_steps(s0, {"op": "unlink", "path": "nope"})


# -- the checker accepts what is allowed ---------------------------------------------------------------
def test_checker_accepts_every_state_since_the_last_fsync():
    base = {"a": H.pattern(1, 0, 2 * BS)}
    log = L(W("a", 0, BS, 2), FS("a"), W("a", BS, BS, 3), W("b", 0, 100, 4), {"op": "rename", "src": "b", "dst": "c"})
    st = states_of(base, log)
    for k in range(1, len(st)):                  # state 1 is the one the fsync made durable
        v = H.check_recovery(base, log, st[k])
        assert v.ok, (k, v.errors)
        assert v.snapshot == k and v.fsync_state == 1
    v = H.check_recovery(base, log, st[0])      # older than the fsync
    assert any(e.startswith("GARBAGE a block 0: write 1 block 0") for e in v.errors), v.errors
    assert any(e.startswith("SNAPSHOT") for e in v.errors), v.errors


def test_checker_accepts_a_partly_landed_inflight_operation():
    base = {"a": b""}
    log = L(FS("a"), {"op": "cp", "src": "a", "dst": "b"}, inflight_last=True)
    assert H.check_recovery(base, log, {"a": b"", "b": b""}).ok
    assert H.check_recovery(base, log, {"a": b""}).ok


# -- ... and catches what is not: each of these must fail -----------------------------------------------
def _fsynced_case():
    base = {}
    log = L(W("a", 0, 3 * BS, 11), W("b", 0, BS, 12), FS("a"), W("b", 0, BS, 13))
    return base, log, states_of(base, log)


def test_checker_catches_a_changed_fsynced_file():
    base, log, st = _fsynced_case()
    rec = dict(st[-1])
    rec["a"] = rec["a"][:5000] + bytes([rec["a"][5000] ^ 1]) + rec["a"][5001:]
    v = H.check_recovery(base, log, rec)
    assert any(e.startswith("FSYNCED a differs at byte 5000") for e in v.errors), v.errors
    assert any("GARBAGE a block 1" in e and "body damaged" in e for e in v.errors), v.errors


def test_checker_catches_a_lost_fsynced_file():
    base, log, st = _fsynced_case()
    rec = {k: v for k, v in st[-1].items() if k != "a"}
    v = H.check_recovery(base, log, rec)
    assert any(e.startswith("FSYNCED a is missing") for e in v.errors), v.errors
    rec = dict(st[-1], a=st[-1]["a"][:BS])
    v = H.check_recovery(base, log, rec)
    assert any("FSYNCED a has 4096 bytes instead of 12288" in e for e in v.errors), v.errors


def test_checker_catches_a_stale_block_from_another_file():
    # the kind of damage a block reused before its release was committed would cause
    base, log, st = _fsynced_case()
    rec = dict(st[-1])
    rec["b"] = st[-1]["a"][2 * BS:3 * BS]
    v = H.check_recovery(base, log, rec)
    assert any(e.startswith("GARBAGE b block 0: write 11 block 2") for e in v.errors), v.errors


def test_checker_catches_a_corrupted_expectation():
    """The recovery is right, the expectation is wrong (an fsync'd write's id edited): it must not pass."""
    base, log, st = _fsynced_case()
    assert H.check_recovery(base, log, st[-1]).ok
    bad = L(W("a", 0, 3 * BS, 99), W("b", 0, BS, 12), FS("a"), W("b", 0, BS, 13))
    v = H.check_recovery(base, bad, st[-1])
    assert any(e.startswith("FSYNCED a differs") for e in v.errors), v.errors
    bad = L(W("a", 0, 3 * BS, 11), W("b", 0, BS, 12), FS("a"), W("b", 0, 2 * BS, 13))
    v = H.check_recovery(base, bad, st[-1])      # a longer last write: b is no longer any whole state
    assert any(e.startswith("SNAPSHOT") for e in v.errors), v.errors
    bad = L(W("a", 0, 3 * BS, 11), W("b", 0, BS, 12), FS("a"), W("b", 0, BS, 13), W("a", 100, 1, 14), FS("b"))
    v = H.check_recovery(base, bad, st[-1])      # an fsync the recovery does not reflect
    assert any(e.startswith("GARBAGE a block 0") for e in v.errors), v.errors


def test_checker_catches_a_torn_rename_and_a_mixed_snapshot():
    base = {"t": H.pattern(1, 0, 2 * BS)}
    log = L(FS("t"), W("tmp", 0, 2 * BS, 2), FS("tmp"), {"op": "rename", "src": "tmp", "dst": "t"},
            W("u", 0, BS, 3))
    st = states_of(base, log)
    torn = {"t": H.pattern(2, 0, BS) + H.pattern(1, BS, BS)}        # half old, half new, tmp gone
    v = H.check_recovery(base, log, torn)
    assert any(e.startswith("SNAPSHOT") for e in v.errors), v.errors
    # the last write (to another file) kept, the rename before it undone: no single state looks like that
    mixed = dict(st[-1])
    mixed["t"] = base["t"]
    assert any(e.startswith("SNAPSHOT") for e in H.check_recovery(base, log, mixed).errors)
    assert any("unexpected" in e or "no state" in e
               for e in H.check_recovery(base, log, dict(st[-1], zz=b"1")).errors)


def test_checker_catches_work_lost_beyond_the_commit_interval():
    base = {}
    log = L(W("a", 0, BS, 1), W("a", BS, BS, 2), t=100.0)         # finished at 100.05 and 100.15
    st = states_of(base, log)
    assert H.check_recovery(base, log, st[1], kill_time=100.5, commit_interval=1.0).ok
    v = H.check_recovery(base, log, st[1], kill_time=103.0, commit_interval=1.0)
    assert any(e.startswith("LOST op 1 write") for e in v.errors), v.errors
    assert v.lost_window == pytest.approx(2.95)


def test_checker_reports_operations_that_failed_on_a_live_mount():
    log = L(W("a", 0, BS, 1))
    log[0].status, log[0].error = "failed", "OSError(5, 'Input/output error')"
    v = H.check_recovery({}, log, {})
    assert any("failed while the mount was alive" in e for e in v.errors)


def test_parse_log_marks_the_killed_operation_inflight():
    text = "\n".join([
        '{"start": true, "t": 1.0}',
        '{"b": 1, "op": {"op": "fsync", "path": "a"}, "t": 1.0}', '{"e": 1, "t": 1.1, "res": null}',
        '{"b": 2, "op": {"op": "unlink", "path": "a"}, "t": 1.2}',
        '{"x": 2, "t": 1.3, "gone": true, "errno": 107, "error": "ENOTCONN"}', '{"b": 3, "op": {"op": "tr'])
    ops = H.parse_log(text)
    assert [(o.seq, o.status) for o in ops] == [(1, "done"), (2, "inflight")]


# -- the real thing -----------------------------------------------------------------------------------------
def _run_rounds(tmp_path, rounds, max_delay):
    need_fuse()
    seed = int(os.environ.get("REFLINKFS_CRASH_SEED", "0")) or None
    lines = []

    class Out:
        def write(self, s):
            lines.append(s)

    results = H.run(rounds=rounds, seed=seed, workdir=str(tmp_path / "crash"), max_delay=max_delay,
                    verbose=True, out=Out())
    assert not is_mounted(tmp_path / "crash" / "mnt")
    report = "".join(lines) + "\n" + H.summarize(results)
    print(report)
    bad = [r for r in results if r.errors]
    assert not bad, "crash rounds with errors (REFLINKFS_CRASH_SEED reruns the same choices):\n" + report
    done = [r for r in results if r.round]
    assert len(done) == rounds
    assert sum(r.verdict.ops_done for r in done) >= 5 * rounds, report
    return done


def test_crash_rounds(tmp_path):
    _run_rounds(tmp_path, rounds=30, max_delay=0.6)


@pytest.mark.slow
def test_crash_rounds_many(tmp_path):
    _run_rounds(tmp_path, rounds=int(os.environ.get("REFLINKFS_CRASH_ROUNDS", "300")), max_delay=1.5)
