#!/usr/bin/env python3
"""Crash harness: SIGKILL the reflinkfs daemon in the middle of a random workload, then prove that nothing
fsync'd was lost and that nothing else turned into garbage.

    python scripts/crash_harness.py [--rounds N] [--seed S] [--workdir DIR] [--keep] [-v]

One store is used for all rounds, so each round starts from what the previous crash left behind. A round:
  1. mount the store (`reflinkfs mount`, a commit interval drawn per round) and read its files: the baseline;
  2. start the workload in a child process: writes (aligned and not, past EOF too), fsync of files and of
     directories, copy_file_range clones, `cp --reflink=auto`, renames (also a temp file fsync'd and then
     renamed over its target), unlinks, truncates, posix_fallocate, files unlinked while held open.
     Every operation is logged before it starts and when it returns, with CLOCK_MONOTONIC times;
  3. after a random delay, SIGKILL the daemon (the process holding STORE/lock), lazy-unmount the dead mount;
  4. fsck the store (data checksums too). It must be clean, except for what a crash leaves and the next
     mount finishes (check.is_leftover): inodes that were unlinked while open (fsck reports them because
     they still hold blocks), segment files of uncommitted writes or not yet deleted, segment blocks not
     yet punched, segment files whose size the commit had not set yet;
  5. mount again and read every file, then check (`check_recovery`):
     - every file fsync'd and not changed since has exactly its fsync'd content;
     - every other file exists or not, has a size and has, per 4 KiB block, contents that some state of the
       workload between the last completed fsync and the crash gave it: old or new, never garbage. Every
       written block carries a header (write id, block number) and a hash-derived body, so a stray block is
       recognised and named;
     - stronger, as the code promises: the whole tree equals the tree after one single atomic step of the
       workload at or after the last completed fsync (a commit is a snapshot), and work that finished more than
       one commit interval (plus slack) before the kill is not lost. Every 5th round runs about 2 s without
       any fsync under a 0.2 s commit interval, so that only the timed commits can keep its work.
At the end the store is unmounted cleanly and fsck must find nothing at all.

The checker is pure (no FUSE) and is unit-tested against wrong recoveries in tests/mount/test_crash.py.
Only the standard library is needed in the workload child; the driver imports reflinkfs for fsck.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from reflinkfs.mounts import is_mounted, lock_holders

BS = 4096
MAGIC = b"RLFSCRSH"
DIRS = ("d0", "d1")
NAMES = ("f0", "f1", "f2", "f3", "d0/a", "d0/b", "d0/c", "d1/x", "d1/y")
MAX_FILE = 24 * BS                 # files stay small: a round is about durability, not volume
GONE_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)
LOST_WINDOW_SLACK = 1.0            # seconds allowed past the commit interval (commit time, scheduling)
TIMED_EVERY = 5                    # every 5th round runs 1.6-2.2 s without any fsync and a 0.2 s commit
TIMED_CI = 0.2                     # interval: only timed commits can save its work, so the bound is tested
COMMIT_INTERVALS = (0.2, 0.5, 1.0, 5.0, 30.0)
MOUNT_TIMEOUT = 30.0


# -- contents that name themselves ----------------------------------------------------------------
@functools.lru_cache(maxsize=8192)
def block_pattern(wid: int, fblock: int) -> bytes:
    """The 4 KiB that write `wid` puts at file block `fblock` (a header, then a body derived from it)."""
    head = MAGIC + struct.pack("<QQ", wid, fblock)
    return head + hashlib.shake_128(head).digest(BS - len(head))


def pattern(wid: int, off: int, nbytes: int) -> bytes:
    """The bytes write `wid` puts at [off, off+nbytes): block_pattern of each file block, sliced."""
    if nbytes <= 0:
        return b""
    b0, b1 = off // BS, (off + nbytes + BS - 1) // BS
    buf = b"".join(block_pattern(wid, b) for b in range(b0, b1))
    return buf[off - b0 * BS: off - b0 * BS + nbytes]


def describe_block(data: bytes) -> str:
    """What a 4 KiB (or shorter, last) block looks like: zeros, a (partial) block of some write, or garbage."""
    if not data.strip(b"\0"):
        return "zeros"
    i = data.find(MAGIC)
    if i >= 0 and i + 24 <= len(data):
        wid, fb = struct.unpack("<QQ", data[i + 8:i + 24])
        whole = block_pattern(wid, fb)
        intact = data[i:] == whole[:len(data) - i]
        return f"write {wid} block {fb} at byte {i}" + ("" if intact else " (body damaged)")
    return f"unrecognised bytes {data[:16].hex()}..."


# -- the model: what each operation does, step by step ----------------------------------------------
class ModelError(Exception):
    """The log describes an operation that is impossible in the modelled state."""


def _put(content: bytes, off: int, data: bytes) -> bytes:
    if off > len(content):
        content = content + bytes(off - len(content))
    return content[:off] + data + content[off + len(data):]


def op_steps(state: dict, op: dict) -> list[dict]:
    """The states after each atomic step of `op` (one step = one request the daemon runs atomically).

    state: path -> bytes. Operations that change nothing (fsync, writes through a held descriptor of an
    unlinked file) have no steps."""
    k = op["op"]
    out: list[dict] = []

    def step(**changes) -> dict:
        s = dict(out[-1] if out else state)
        for p, v in changes.items():
            if v is None:
                s.pop(p, None)
            else:
                s[p] = v
        out.append(s)
        return s

    def cur() -> dict:
        return out[-1] if out else state

    def need(p: str) -> bytes:
        if p not in cur():
            raise ModelError(f"{k}: {p} does not exist")
        return cur()[p]

    if k == "write":
        p = op["path"]
        if p not in state:
            step(**{p: b""})                      # create
        step(**{p: _put(cur()[p], op["off"], pattern(op["id"], op["off"], op["len"]))})
    elif k == "truncate":
        c = need(op["path"])
        size = op["size"]
        step(**{op["path"]: c[:size] + bytes(max(0, size - len(c)))})
    elif k == "falloc":
        c = need(op["path"])
        end = op["off"] + op["len"]
        step(**{op["path"]: c + bytes(max(0, end - len(c)))})
    elif k == "cfr":
        src = need(op["src"])
        if op["dst"] not in state:
            step(**{op["dst"]: b""})
        n = max(0, min(op["len"], len(src) - op["soff"]))
        if n:
            step(**{op["dst"]: _put(cur()[op["dst"]], op["doff"], src[op["soff"]:op["soff"] + n])})
    elif k == "cp":
        src = need(op["src"])
        step(**{op["dst"]: b""})                  # created, or truncated by O_TRUNC
        step(**{op["dst"]: src})                  # one copy_file_range of the whole file
    elif k == "rename":
        c = need(op["src"])
        step(**{op["dst"]: c, op["src"]: None}) if op["src"] != op["dst"] else None
    elif k in ("unlink", "open_unlink"):
        need(op["path"])
        step(**{op["path"]: None})
    elif k in ("fsync", "fsyncdir", "hwrite", "hclose"):
        if k == "fsync":
            need(op["path"])
    else:
        raise ModelError(f"unknown operation {k!r}")
    return out


# -- the workload (runs in a child process, standard library only) ----------------------------------
class Workload:
    def __init__(self, mnt: str, log_path: str, seed: int, round_no: int, max_seconds: float,
                 fsyncs: bool = True):
        self.mnt = mnt
        self.rng = random.Random(seed)
        self.log = open(log_path, "w", buffering=1)
        self.round = round_no
        self.max_seconds = max_seconds
        self.fsync_weight = self.rng.choice((0.0, 0.1, 0.5, 1.0, 1.5)) if fsyncs else 0.0
        self.seq = 0
        self.held: dict[int, int] = {}           # held id -> fd of a file unlinked while open
        self.state: dict[str, bytes] = {}
        for d in ("",) + DIRS:
            for e in os.scandir(os.path.join(mnt, d)):
                if e.is_file(follow_symlinks=False):
                    with open(e.path, "rb") as f:
                        self.state[os.path.join(d, e.name) if d else e.name] = f.read()

    def P(self, p: str) -> str:
        return os.path.join(self.mnt, p)

    def _wid(self) -> int:
        return self.round * 1_000_000 + self.seq

    def choose(self) -> list[dict]:
        r, st = self.rng, self.state
        files = sorted(st)
        nonempty = [p for p in files if st[p]]
        f = self.fsync_weight
        kinds = {"write": 30, "fsync": 14 * f, "fsyncdir": 4 * f, "replace": 7 * f, "cfr": 8, "cp": 5,
                 "rename": 6, "unlink": 5, "truncate": 8, "falloc": 4, "open_unlink": 4, "held": 4}
        if not files:
            kinds = {"write": 1}
        if not nonempty:
            kinds.pop("cfr", None), kinds.pop("cp", None)
        if len(self.held) >= 3:
            kinds.pop("open_unlink", None)
        if not self.held:
            kinds.pop("held", None)
        kind = r.choices(list(kinds), weights=list(kinds.values()))[0]
        if kind == "write":
            p = r.choice(NAMES)
            size = len(st.get(p, b""))
            if r.random() < 0.65:
                off = r.randrange(0, min(size // BS + 2, MAX_FILE // BS - 4)) * BS
                n = r.randint(1, 4) * BS
            else:
                off = r.randrange(0, min(size + 2 * BS, MAX_FILE - 8 * BS))
                n = r.randint(1, 5 * BS)
            return [{"op": "write", "path": p, "off": off, "len": n, "id": self._wid()}]
        if kind == "fsync":
            return [{"op": "fsync", "path": r.choice(files)}]
        if kind == "fsyncdir":
            return [{"op": "fsyncdir", "path": r.choice(("",) + DIRS)}]
        if kind == "cfr":
            src = r.choice(nonempty)
            dst = r.choice([p for p in NAMES if p != src])
            ssize, dsize = len(st[src]), len(st.get(dst, b""))
            if r.random() < 0.7:
                soff = r.randrange(0, (ssize + BS - 1) // BS) * BS
                doff = r.randrange(0, min(dsize // BS + 2, MAX_FILE // BS - 6)) * BS
            else:
                soff = r.randrange(0, ssize)
                doff = r.randrange(0, min(dsize + BS, MAX_FILE - 6 * BS))
            return [{"op": "cfr", "src": src, "dst": dst, "soff": soff, "doff": doff,
                     "len": r.choice((r.randint(1, 6 * BS), r.randint(1, 6) * BS, ssize))}]
        if kind == "cp":
            src = r.choice(nonempty)
            return [{"op": "cp", "src": src, "dst": r.choice([p for p in NAMES if p != src])}]
        if kind == "rename":
            src = r.choice(files)
            return [{"op": "rename", "src": src, "dst": r.choice([p for p in NAMES if p != src])}]
        if kind == "replace":
            # the classic atomic replace: write a temp file, fsync it, rename it over the target
            dst = r.choice(NAMES)
            tmp = os.path.join(os.path.dirname(dst), f".tmp{self.round}.{self.seq}")
            return [{"op": "write", "path": tmp, "off": 0, "len": r.randint(1, 6 * BS), "id": self._wid()},
                    {"op": "fsync", "path": tmp}, {"op": "rename", "src": tmp, "dst": dst}]
        if kind == "unlink":
            return [{"op": "unlink", "path": r.choice(files)}]
        if kind == "truncate":
            p = r.choice(files)
            size = len(st[p])
            new = r.choice((0, r.randrange(0, size + 1), min(MAX_FILE, size + r.randrange(1, 3 * BS)),
                            (size // BS) * BS))
            return [{"op": "truncate", "path": p, "size": new}]
        if kind == "falloc":
            off = r.randrange(0, MAX_FILE - 4 * BS)
            return [{"op": "falloc", "path": r.choice(files), "off": off, "len": r.randint(1, 3 * BS)}]
        if kind == "open_unlink":
            return [{"op": "open_unlink", "path": r.choice(files), "hid": self.seq}]
        hid = r.choice(sorted(self.held))
        if r.random() < 0.6:
            return [{"op": "hwrite", "hid": hid, "off": r.randrange(0, 8) * BS, "len": r.randint(1, 3 * BS),
                     "id": self._wid()}]
        return [{"op": "hclose", "hid": hid}]

    def do(self, op: dict):
        k = op["op"]
        if k == "write":
            fd = os.open(self.P(op["path"]), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                data = pattern(op["id"], op["off"], op["len"])
                n = os.pwrite(fd, data, op["off"])
                if n != len(data):
                    raise RuntimeError(f"short write: {n} of {len(data)}")
            finally:
                os.close(fd)
        elif k == "fsync":
            fd = os.open(self.P(op["path"]), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif k == "fsyncdir":
            fd = os.open(self.P(op["path"]) if op["path"] else self.mnt, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif k == "cfr":
            sfd = os.open(self.P(op["src"]), os.O_RDONLY | os.O_CLOEXEC)
            try:
                dfd = os.open(self.P(op["dst"]), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    return os.copy_file_range(sfd, dfd, op["len"], op["soff"], op["doff"])
                finally:
                    os.close(dfd)
            finally:
                os.close(sfd)
        elif k == "cp":
            st = os.stat(self.P(op["src"]))
            if st.st_blocks < st.st_size // 512:
                # GNU cp reads a "probably sparse" source and writes it piece by piece; this model has one
                # copy step, so such sources are copied with one copy_file_range instead (same two steps)
                sfd = os.open(self.P(op["src"]), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    dfd = os.open(self.P(op["dst"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                    try:
                        return ["sparse", os.copy_file_range(sfd, dfd, 1 << 30, 0, 0)]
                    finally:
                        os.close(dfd)
                finally:
                    os.close(sfd)
            r = subprocess.run(["cp", "--reflink=auto", self.P(op["src"]), self.P(op["dst"])],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"cp failed: {r.stderr.strip()}")
        elif k == "rename":
            os.rename(self.P(op["src"]), self.P(op["dst"]))
        elif k == "unlink":
            os.unlink(self.P(op["path"]))
        elif k == "truncate":
            os.truncate(self.P(op["path"]), op["size"])
        elif k == "falloc":
            fd = os.open(self.P(op["path"]), os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.posix_fallocate(fd, op["off"], op["len"])
            finally:
                os.close(fd)
        elif k == "open_unlink":
            fd = os.open(self.P(op["path"]), os.O_RDWR | os.O_CLOEXEC)
            self.held[op["hid"]] = fd
            os.unlink(self.P(op["path"]))
        elif k == "hwrite":
            os.pwrite(self.held[op["hid"]], pattern(op["id"], op["off"], op["len"]), op["off"])
        elif k == "hclose":
            os.close(self.held.pop(op["hid"]))
        return None

    def mount_gone(self) -> bool:
        try:
            os.stat(self.mnt)
            os.listdir(self.mnt)
            return False
        except OSError as e:
            return e.errno in GONE_ERRNOS

    def run(self) -> int:
        self.deadline = time.monotonic() + self.max_seconds
        self.log.write(json.dumps({"start": True, "t": time.monotonic()}) + "\n")
        while time.monotonic() < self.deadline:
            for op in self.choose():
                self.seq += 1
                self.log.write(json.dumps({"b": self.seq, "op": op, "t": time.monotonic()}) + "\n")
                try:
                    res = self.do(op)
                except Exception as e:            # noqa: BLE001 - every failure is logged for the checker
                    gone = (isinstance(e, OSError) and e.errno in GONE_ERRNOS) or self.mount_gone()
                    self.log.write(json.dumps({"x": self.seq, "t": time.monotonic(), "gone": gone,
                                               "errno": getattr(e, "errno", None), "error": repr(e)}) + "\n")
                    return 0 if gone else 3
                self.log.write(json.dumps({"e": self.seq, "t": time.monotonic(), "res": res}) + "\n")
                self.state = (op_steps(self.state, op) or [self.state])[-1]
        self.log.write(json.dumps({"end": True, "t": time.monotonic()}) + "\n")
        return 0


# -- the checker ---------------------------------------------------------------------------------------
@dataclass
class LoggedOp:
    seq: int
    op: dict
    t0: float
    t1: float | None = None
    status: str = "inflight"          # done | inflight (began, no answer: the kill came) | failed
    result: object = None
    error: str | None = None


def parse_log(text: str) -> list[LoggedOp]:
    ops: dict[int, LoggedOp] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue                      # a line cut short when the workload stopped
        if "b" in rec:
            ops[rec["b"]] = LoggedOp(rec["b"], rec["op"], rec["t"])
        elif "e" in rec:
            o = ops[rec["e"]]
            o.t1, o.status, o.result = rec["t"], "done", rec.get("res")
        elif "x" in rec:
            o = ops[rec["x"]]
            o.t1, o.error = rec["t"], rec.get("error")
            o.status = "inflight" if rec.get("gone") else "failed"
    return [ops[k] for k in sorted(ops)]


@dataclass
class Verdict:
    errors: list[str] = field(default_factory=list)
    states: int = 0                    # states of the workload, the baseline included
    fsync_state: int = 0               # index of the state the last completed fsync made durable
    snapshot: int | None = None        # the latest state the recovered tree equals
    ops_done: int = 0
    ops_lost: int = 0                  # completed operations whose effect was not recovered
    lost_window: float | None = None   # kill time minus the end of the earliest lost completed operation
    fsynced_files: int = 0             # files fsync'd themselves and unchanged since
    determined_files: int = 0          # files the last completed fsync fixed completely (same in every candidate)

    @property
    def ok(self) -> bool:
        return not self.errors


def _block_ok(have_blk: bytes, j: int, cands: list[bytes]) -> bool:
    n = len(have_blk)
    for c in cands:
        cb = c[j * BS:j * BS + n]
        if len(cb) < n:
            cb = cb + bytes(n - len(cb))
        if cb == have_blk:
            return True
    return False


def check_recovery(baseline: dict, log: list[LoggedOp], recovered: dict, *, kill_time: float | None = None,
                   commit_interval: float | None = None, slack: float = LOST_WINDOW_SLACK) -> Verdict:
    """Compare the tree found after the crash (path -> bytes) with what the logged workload allows."""
    v = Verdict()
    states = [baseline]
    op_states: list[tuple[LoggedOp, list[int]]] = []
    fsync_state = 0
    fsynced: dict[str, int] = {}       # path -> state index at the end of its last completed fsync
    for o in log:
        try:
            steps = op_steps(states[-1], o.op)
        except ModelError as e:
            v.errors.append(f"op {o.seq} {o.op}: the model cannot apply it ({e}); the workload and the model disagree")
            break
        if o.status == "failed":
            v.errors.append(f"op {o.seq} {o.op} failed while the mount was alive: {o.error}")
        if o.status == "done" and o.op["op"] == "cfr":
            src = states[-1][o.op["src"]]
            want = max(0, min(o.op["len"], len(src) - o.op["soff"]))
            if o.result != want:
                v.errors.append(f"op {o.seq} {o.op}: copy_file_range returned {o.result}, expected {want}")
        idx = []
        for s in steps:
            states.append(s)
            idx.append(len(states) - 1)
        op_states.append((o, idx))
        if o.status == "done":
            v.ops_done += 1
            if o.op["op"] in ("fsync", "fsyncdir"):
                fsync_state = len(states) - 1
                if o.op["op"] == "fsync":
                    fsynced[o.op["path"]] = len(states) - 1
        if o.status != "done":
            break                       # nothing after an unanswered operation was started
    v.states, v.fsync_state = len(states), fsync_state
    window = states[fsync_state:]

    # 1. what fsync promised: a file fsync'd and unchanged since has exactly its fsync'd content
    for p, t in sorted(fsynced.items()):
        want = states[t].get(p)
        if want is None or any(s.get(p) != want for s in states[t:]):
            continue                    # changed (or renamed away) after its fsync: not promised any more
        v.fsynced_files += 1
        have = recovered.get(p)
        if have != want:
            what = "is missing" if have is None else (
                f"has {len(have)} bytes instead of {len(want)}" if len(have) != len(want) else
                f"differs at byte {next(i for i in range(len(want)) if have[i] != want[i])}")
            v.errors.append(f"FSYNCED {p} {what} (fsync'd in state {t}, unchanged since)")

    # 2. every file: present or not, size and each block as some state since the last fsync had them
    paths = set(recovered).union(*[set(s) for s in window])
    for p in sorted(paths):
        cands = [s.get(p) for s in window]
        present = [c for c in cands if c is not None]
        have = recovered.get(p)
        if have is None:
            if len(present) == len(cands):
                v.errors.append(f"{p} is missing, but exists in every state since the last fsync")
            continue
        if not present:
            v.errors.append(f"{p} exists after the crash, but in no state since the last fsync")
            continue
        if len(present) == len(cands) and all(c == present[0] for c in present):
            v.determined_files += 1
        sizes = sorted({len(c) for c in present})
        if len(have) not in sizes:
            v.errors.append(f"{p} has size {len(have)}; states since the last fsync have {sizes[:8]}")
        bad = []
        for j in range((len(have) + BS - 1) // BS):
            blk = have[j * BS:(j + 1) * BS]
            if not _block_ok(blk, j, present):
                bad.append(j)
        for j in bad[:4]:
            blk = have[j * BS:(j + 1) * BS]
            seen = sorted({describe_block(c[j * BS:(j + 1) * BS]) for c in present if len(c) > j * BS})
            v.errors.append(f"GARBAGE {p} block {j}: {describe_block(blk)}; allowed: {seen[:6] or ['zeros']}")
        if len(bad) > 4:
            v.errors.append(f"GARBAGE {p}: {len(bad) - 4} more bad blocks")

    # 3. stronger, as the code promises: the tree is one state (a commit is a snapshot), lost work is recent
    matches = [k for k in range(fsync_state, len(states)) if states[k] == recovered]
    if not matches:
        near = min(range(fsync_state, len(states)),
                   key=lambda k: sum(states[k].get(p) != recovered.get(p) for p in set(states[k]) | set(recovered)))
        diff = sorted(p for p in set(states[near]) | set(recovered) if states[near].get(p) != recovered.get(p))
        v.errors.append(f"SNAPSHOT the recovered tree equals no single state {fsync_state}..{len(states) - 1}; "
                        f"nearest is state {near}, differing in {diff[:8]}")
    else:
        v.snapshot = k = matches[-1]
        lost = [o for o, idx in op_states if o.status == "done" and idx and max(idx) > k]
        v.ops_lost = len(lost)
        if lost and kill_time is not None:
            v.lost_window = kill_time - min(o.t1 for o in lost)
            if commit_interval is not None and v.lost_window > commit_interval + slack:
                first = min(lost, key=lambda o: o.t1)
                v.errors.append(f"LOST op {first.seq} {first.op['op']} finished {v.lost_window:.2f} s before the kill "
                                f"and was not recovered (commit interval {commit_interval} s)")
    return v


# -- driving a mount from outside ---------------------------------------------------------------------
def cli_cmd(*args) -> list[str]:
    script = Path(sys.executable).parent / "reflinkfs"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "reflinkfs.cli"]
    return base + [str(a) for a in args]






def lock_free(store) -> bool:
    fd = os.open(os.path.join(store, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def wait_until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def reap(pid: int, timeout: float) -> int | None:
    """Wait for a child; its exit status, or None if it is still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


class HarnessError(Exception):
    pass


def mount(store, mnt, commit_interval: float) -> int:
    """`reflinkfs mount`; returns the daemon's pid."""
    r = subprocess.run(cli_cmd("mount", store, mnt, "--commit-interval", commit_interval),
                       capture_output=True, text=True, timeout=MOUNT_TIMEOUT, stdin=subprocess.DEVNULL)
    if r.returncode != 0 or not is_mounted(mnt):
        force_off(store, mnt)
        raise HarnessError(f"mount failed ({r.returncode}): {r.stderr.strip()}")
    pids = lock_holders(store)
    if len(pids) != 1:
        force_off(store, mnt)
        raise HarnessError(f"expected one process holding {store}/lock, found {pids}")
    return pids[0]


def force_off(store, mnt) -> None:
    """Whatever state the mount is in: lazy-unmount it and kill whatever holds the store."""
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)
    for pid in lock_holders(store):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: lock_free(store), 10)
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def umount(store, mnt) -> None:
    try:
        r = subprocess.run(cli_cmd("umount", mnt), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        force_off(store, mnt)
        raise HarnessError("reflinkfs umount hung") from None
    if r.returncode != 0 or is_mounted(mnt) or not wait_until(lambda: lock_free(store), 30):
        force_off(store, mnt)
        raise HarnessError(f"reflinkfs umount failed ({r.returncode}): {r.stderr.strip()}")


def read_tree(mnt) -> dict:
    """Every regular file of the workload's directories, path -> bytes. Unexpected entries are errors."""
    out = {}
    for d in ("",) + DIRS:
        base = os.path.join(mnt, d)
        for e in os.scandir(base):
            rel = os.path.join(d, e.name) if d else e.name
            if not d and e.name in DIRS:
                continue
            st = e.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise HarnessError(f"unexpected entry {rel!r} (mode {st.st_mode:o}) after the crash")
            with open(e.path, "rb", buffering=0) as f:
                data = f.read()
            if len(data) != st.st_size:
                raise HarnessError(f"{rel}: read {len(data)} bytes but stat says {st.st_size}")
            out[rel] = data
    return out


def fsck_findings(store) -> list[str]:
    from reflinkfs.check import fsck
    return fsck(str(store), verify_data=True).findings


ORPHAN = "orphan: inode "
ORPHAN_OK = "was unlinked while open and is still allocated"


@dataclass
class RoundResult:
    round: int
    commit_interval: float
    delay: float
    verdict: Verdict
    orphans: int
    errors: list[str]
    next_daemon: int = 0
    next_interval: float = 0.0


def crash_round(rno: int, rng: random.Random, store: Path, mnt: Path, base: Path, daemon: int, ci: float,
                max_delay: float) -> RoundResult:
    """One round on a mounted store: workload, SIGKILL, fsck, remount (left mounted), check."""
    errors: list[str] = []
    try:
        baseline = read_tree(mnt)
    except (HarnessError, OSError) as e:
        return RoundResult(rno, ci, 0.0, Verdict(), 0, [f"reading the tree before the workload: {e}"], daemon, ci)
    log_path = base / f"round{rno}.log"
    timed = rno % TIMED_EVERY == 0
    delay = rng.uniform(1.6, 2.2) if timed else rng.uniform(0.05, max_delay)
    wseed = rng.randrange(1 << 32)
    pid = os.fork()             # a forked child starts at once; a new interpreter would take 0.2 s
    if pid == 0:
        code = 4
        try:
            code = Workload(str(mnt), str(log_path), wseed, rno, delay + 4.0, fsyncs=not timed).run()
        except BaseException:   # noqa: BLE001 - report anything, and never return into the harness
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    # the delay counts from the workload's first operation, not from its start-up
    if not wait_until(lambda: log_path.exists() and '"start"' in log_path.read_text(), 20):
        errors.append("the workload did not start within 20 s")
    time.sleep(delay)
    kill_time = time.monotonic()
    os.kill(daemon, signal.SIGKILL)
    code = reap(pid, 30)
    if code is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        errors.append("the workload did not stop within 30 s of the kill")
    elif code != 0:
        errors.append(f"the workload exited with status {code} (see the round's log and stderr)")
    if not wait_until(lambda: lock_free(store), 10):
        errors.append("the killed daemon still holds the store lock after 10 s")
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)
    if is_mounted(mnt):
        force_off(store, mnt)
    findings = fsck_findings(store)
    orphans = [f for f in findings if f.startswith(ORPHAN) and ORPHAN_OK in f]
    from reflinkfs.check import is_leftover     # orphans, stray segment files, unpunched blocks, unset sizes
    errors += [f"fsck after the crash: {f}" for f in findings if not is_leftover(f)]
    next_ci = TIMED_CI if (rno + 1) % TIMED_EVERY == 0 else rng.choice(COMMIT_INTERVALS)
    next_daemon = mount(store, mnt, next_ci)
    v = Verdict()
    try:
        recovered = read_tree(mnt)
    except (HarnessError, OSError) as e:
        errors.append(f"reading the recovered tree: {e}")
    else:
        v = check_recovery(baseline, parse_log(log_path.read_text()), recovered, kill_time=kill_time,
                           commit_interval=ci)
        errors += v.errors
    return RoundResult(rno, ci, delay, v, len(orphans), errors, next_daemon, next_ci)


def run(rounds: int = 30, seed: int | None = None, workdir: str | None = None, keep: bool = False,
        verbose: bool = False, max_delay: float = 1.0, out=sys.stdout) -> list[RoundResult]:
    """Run `rounds` crash rounds on one store; return per-round results (errors included, never raised
    for a check failure; HarnessError for a harness that cannot go on)."""
    seed = random.randrange(1 << 32) if seed is None else seed
    rng = random.Random(seed)
    base = Path(workdir or tempfile.mkdtemp(prefix="reflinkfs-crash-"))
    base.mkdir(parents=True, exist_ok=True)
    store, mnt = base / "store", base / "mnt"
    mnt.mkdir(exist_ok=True)
    r = subprocess.run(cli_cmd("mkfs", store), capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise HarnessError(f"mkfs failed: {r.stderr.strip()}")
    print(f"crash harness: seed {seed}, {rounds} rounds, store {store}", file=out)
    results: list[RoundResult] = []
    ci = rng.choice(COMMIT_INTERVALS)
    daemon = mount(store, mnt, ci)
    try:
        for d in DIRS:
            os.mkdir(mnt / d)
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
        for rno in range(1, rounds + 1):
            res = crash_round(rno, rng, store, mnt, base, daemon, ci, max_delay)
            results.append(res)
            daemon, ci = res.next_daemon, res.next_interval
            v = res.verdict
            if verbose or res.errors:
                print(f"round {rno}: commit interval {res.commit_interval}s, kill after {res.delay:.2f}s, "
                      f"{v.ops_done} ops done, fsync state {v.fsync_state}, snapshot {v.snapshot}/{v.states - 1}, "
                      f"lost {v.ops_lost} ops" + (f" ({v.lost_window:.2f}s)" if v.lost_window is not None else "")
                      + f", {v.determined_files} files fixed by fsync ({v.fsynced_files} fsync'd themselves), "
                      f"{res.orphans} orphans", file=out)
                for e in res.errors[:20]:
                    print(f"  ERROR {e}", file=out)
            if res.errors:
                break           # the store is not what the next round's model would start from
            if not keep:
                (base / f"round{rno}.log").unlink(missing_ok=True)
        umount(store, mnt)
        final = fsck_findings(store)
        if final:
            results.append(RoundResult(0, 0.0, 0.0, Verdict(), 0, [f"fsck after the final unmount: {f}" for f in final]))
    finally:
        if is_mounted(mnt) or lock_holders(store):
            force_off(store, mnt)
        if not keep and workdir is None and not any(r.errors for r in results):
            shutil.rmtree(base, ignore_errors=True)
    return results


def summarize(results: list[RoundResult]) -> str:
    rounds = [r for r in results if r.round]
    bad = [r for r in results if r.errors]
    lossy = [r for r in rounds if r.verdict.lost_window is not None]
    worst = max(lossy, key=lambda r: r.verdict.lost_window - r.commit_interval, default=None)
    return (f"{len(rounds)} rounds, {len(bad)} with errors; {sum(r.verdict.ops_done for r in rounds)} operations; "
            f"{sum(r.verdict.determined_files for r in rounds)} files whose contents an fsync had fixed "
            f"({sum(r.verdict.fsynced_files for r in rounds)} of them fsync'd themselves); "
            f"{sum(r.verdict.ops_lost for r in rounds)} completed operations lost in {len(lossy)} rounds"
            + (f" (closest to the bound: finished {worst.verdict.lost_window:.2f} s before the kill with a "
               f"{worst.commit_interval} s commit interval; allowed {worst.commit_interval + LOST_WINDOW_SLACK:.1f} s)"
               if worst else "")
            + f"; {sum(r.orphans for r in rounds)} unlinked-while-open inodes reported by fsck after a crash")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_workload"]:
        mnt, log_path, seed, rno, secs = argv[1:6]
        return Workload(mnt, log_path, int(seed), int(rno), float(secs)).run()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seed", type=int)
    p.add_argument("--workdir", help="where the store, mountpoint and logs go (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the store and every round's log")
    p.add_argument("--max-delay", type=float, default=1.0, help="longest time before the kill, seconds")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per round")
    args = p.parse_args(argv)
    if not os.path.exists("/dev/fuse"):
        print("crash_harness: /dev/fuse is missing", file=sys.stderr)
        return 2
    try:
        results = run(args.rounds, args.seed, args.workdir, args.keep, args.verbose, args.max_delay)
    except HarnessError as e:
        print(f"crash_harness: {e}", file=sys.stderr)
        return 2
    print(summarize(results))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
