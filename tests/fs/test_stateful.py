"""Random sequences of data operations against an in-memory model of every file.

After every step: each file reads back exactly as its model, fsck is clean (after a commit), and the
physical blocks in use are exactly the distinct blocks that some extent map refers to (nothing leaked,
nothing shared that the maps do not share). A `batch` step runs several operations in one transaction,
so that blocks written earlier in it are overwritten in place and released blocks are still pending.
A second machine runs on a store so small that operations run out of space: a refused operation must
change nothing.
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from reflinkfs.check import fsck_db
from reflinkfs.core.volume import Volume
from reflinkfs.errors import FsError
from reflinkfs.meta.schema import mkfs

BS = 4096
MAX = 64 * 1024
NAMES = [b"f0", b"f1", b"f2"]
# Every step commits, and a commit is a few fsyncs: on tmpfs they cost nothing. Durability itself is
# the crash test's business (test_volume.py).
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None

names = st.sampled_from(NAMES)
offsets = st.one_of(st.integers(0, MAX), st.integers(0, MAX // BS).map(lambda b: b * BS))
lengths = st.one_of(st.integers(0, 3 * BS), st.integers(0, 4).map(lambda b: b * BS),
                    st.integers(1, 4).map(lambda b: b * BS - 1), st.integers(1, 4).map(lambda b: b * BS + 1))
sizes = st.one_of(st.integers(0, MAX), st.integers(0, MAX // BS).map(lambda b: b * BS))

OPS = {
    "write": dict(name=names, off=offsets, n=lengths, seed=st.integers(0, 255)),
    "fill": dict(name=names, nblocks=st.integers(2, 12), seed=st.integers(0, 255)),   # fills a small store
    "clone": dict(src=names, dst=names, src_off=offsets, dst_off=offsets, n=st.one_of(lengths, st.just(MAX))),
    "truncate": dict(name=names, size=sizes),
    "punch_hole": dict(name=names, off=offsets, n=lengths.filter(bool)),
    "zero_range": dict(name=names, off=offsets, n=lengths.filter(bool), keep_size=st.booleans()),
    "allocate": dict(name=names, off=offsets, n=lengths.filter(bool), keep_size=st.booleans()),
    "unlink_and_recreate": dict(name=names, keep_open=st.booleans()),
}


def _extend(model: bytearray, size: int) -> None:
    if len(model) < size:
        model.extend(bytes(size - len(model)))


class VolumeMachine(RuleBasedStateMachine):
    size_limit = 0

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="reflinkfs-stateful-", dir=SCRATCH)
        self.store = self.dir + "/store"
        mkfs(self.store, size_limit=self.size_limit)
        self.v = Volume.open(self.store)
        self.model: dict[bytes, bytearray] = {}
        for name in NAMES:
            self._create(name)

    def teardown(self):
        if self.v is not None:
            self.v.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _create(self, name: bytes) -> None:
        self.v.create(1, name, 0o644, 0, 0)
        self.model[name] = bytearray()

    def ino(self, name: bytes) -> int:
        return self.v.lookup(1, name).ino

    def done(self, fn, *args, **kwargs) -> bool:
        """Run an operation; False if a size-limited store refused it (then it must have changed nothing)."""
        try:
            fn(*args, **kwargs)
        except FsError as e:
            if e.errno == errno.ENOSPC and self.size_limit:
                return False
            raise
        return True

    # -- operations, each applied to the volume and to the model --------------------------------
    def _write(self, name, off, n, seed):
        data = random.Random(seed).randbytes(n)
        if not self.done(self.v.write, self.ino(name), off, data):
            return
        m = self.model[name]
        if n:
            _extend(m, off)
            m[off:off + n] = data

    def _fill(self, name, nblocks, seed):
        self._write(name, 0, nblocks * BS, seed)

    def _clone(self, src, dst, src_off, dst_off, n):
        ms, md = self.model[src], self.model[dst]
        want = max(0, min(n, len(ms) - src_off))
        args = (self.ino(src), src_off, self.ino(dst), dst_off, n)
        if src == dst and want and src_off < dst_off + want and dst_off < src_off + want:
            try:
                self.v.clone_range(*args)
            except FsError as e:
                assert e.errno == errno.EINVAL
                return
            raise AssertionError("overlapping clone within one file was not refused")
        got = []
        if not self.done(lambda: got.append(self.v.clone_range(*args))):
            return
        assert got == [want]
        if want:
            piece = bytes(ms[src_off:src_off + want])
            _extend(md, dst_off)
            md[dst_off:dst_off + want] = piece

    def _truncate(self, name, size):
        if not self.done(self.v.truncate, self.ino(name), size):
            return
        m = self.model[name]
        del m[size:]
        _extend(m, size)

    def _punch_hole(self, name, off, n):
        if not self.done(self.v.punch_hole, self.ino(name), off, n):
            return
        m = self.model[name]
        m[off:off + n] = bytes(len(m[off:off + n]))

    def _zero_range(self, name, off, n, keep_size):
        if not self.done(self.v.zero_range, self.ino(name), off, n, keep_size=keep_size):
            return
        m = self.model[name]
        m[off:off + n] = bytes(len(m[off:off + n]))
        if not keep_size:
            _extend(m, off + n)

    def _allocate(self, name, off, n, keep_size):
        if not self.done(self.v.allocate, self.ino(name), off, n, keep_size=keep_size):
            return
        if not keep_size:
            _extend(self.model[name], off + n)

    def _unlink_and_recreate(self, name, keep_open):
        ino = self.ino(name)
        if keep_open:
            self.v.opened(ino)
        self.v.unlink(1, name)
        if keep_open:   # still readable through the open handle, until released
            assert bytes(self.v.read(ino, 0, MAX * 3)) == self.model[name]
            self.v.released(ino)
        self._create(name)

    # -- rules ---------------------------------------------------------------------------------
    @rule(**OPS["write"])
    def write(self, **kw):
        self._write(**kw)

    @rule(**OPS["fill"])
    def fill(self, **kw):
        self._fill(**kw)

    @rule(**OPS["clone"])
    def clone(self, **kw):
        self._clone(**kw)

    @rule(**OPS["truncate"])
    def truncate(self, **kw):
        self._truncate(**kw)

    @rule(**OPS["punch_hole"])
    def punch_hole(self, **kw):
        self._punch_hole(**kw)

    @rule(**OPS["zero_range"])
    def zero_range(self, **kw):
        self._zero_range(**kw)

    @rule(**OPS["allocate"])
    def allocate(self, **kw):
        self._allocate(**kw)

    @rule(**OPS["unlink_and_recreate"])
    def unlink_and_recreate(self, **kw):
        self._unlink_and_recreate(**kw)

    @rule(data=st.data())
    def batch(self, data):
        """Several operations in one transaction, files checked after each."""
        for kind in data.draw(st.lists(st.sampled_from(sorted(OPS)), min_size=2, max_size=5)):
            getattr(self, "_" + kind)(**data.draw(st.fixed_dictionaries(OPS[kind]), label=kind))
            self.files_match_model()

    @rule()
    def reopen(self):
        self.v.close()
        self.v = None
        self.v = Volume.open(self.store)

    # -- checks after every step ---------------------------------------------------------------
    @invariant()
    def files_match_model(self):
        for name, m in self.model.items():
            ino = self.ino(name)
            assert self.v.getattr(ino).size == len(m)
            assert bytes(self.v.read(ino, 0, MAX * 3)) == m, f"{name!r} differs from its model"

    @invariant()
    def fsck_clean_and_no_leaks(self):
        self.v.commit()
        assert fsck_db(self.v.db, self.v.data.path, verify_data=True).findings == []
        in_use = self.v.db.execute("SELECT COALESCE(SUM(nblocks), 0) FROM refs").fetchone()[0]
        referenced = {pb + i for name in NAMES for _, pb, n, _ in self.v.extent_map(self.ino(name))
                      for i in range(n)}
        assert in_use == len(referenced)
        assert self.v.statfs()["files_used"] == self.v.db.execute("SELECT COUNT(*) FROM inodes").fetchone()[0]


class FullVolumeMachine(VolumeMachine):
    """The same on a store of 16 blocks: operations run out of space, and a refused one changes nothing."""
    size_limit = 16 * BS


TestVolumeMachine = VolumeMachine.TestCase
TestVolumeMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestFullVolumeMachine = FullVolumeMachine.TestCase
TestFullVolumeMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
