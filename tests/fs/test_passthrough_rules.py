"""The passthrough rules (reflinkfs/fuse/passthrough.py), driven through the adapter without a mount: the
kernel's side is a counter of registrations. Which opens pass through, one registration per segment
shared by the clones whole on it, and the two races of a change with a passthrough reader: the reader
stays open (the change waits WRITE_WAIT seconds, then ETXTBSY), and the reader's RELEASE arrives while
the change waits (it goes on). Time is trio's mock clock: the waits cost nothing.

a is written from empty, so the allocator lays it out whole in a segment of its own; z is kept in segment 0.
"""
from __future__ import annotations

import errno
import inspect
import os
import random

import pytest
import trio
import trio.testing

from reflinkfs import xattrs
from reflinkfs.check import fsck
from reflinkfs.core.volume import Volume
from reflinkfs.errors import FsError
from reflinkfs.fuse import adapter
from reflinkfs.fuse.adapter import Operations
from reflinkfs.fuse.passthrough import Passthrough, readonly_view
from reflinkfs.meta import schema

BS = 4096
DATA = random.Random(7).randbytes(5 * BS + 100)


class Kernel:
    """What the kernel would hold: registrations by id."""

    def __init__(self):
        self.next_id = 1
        self.live: dict[int, int] = {}      # id -> inode number of the registered file
        self.opened = 0

    def register(self, fd: int) -> int:
        assert os.fstat(fd).st_size == len(DATA)
        i, self.next_id = self.next_id, self.next_id + 1
        self.live[i] = os.fstat(fd).st_ino
        self.opened += 1
        return i

    def unregister(self, backing_id: int) -> None:
        del self.live[backing_id]


@pytest.fixture
def fs(store):
    """(ops, inodes, kernel): a whole in segment 1, b a clone of it, z in segment 0."""
    v = Volume.open(store)
    a = v.create(1, b"a", 0o644, 0, 0).ino
    v.write(a, 0, DATA)
    v.small_file_bytes = 1 << 62                 # z keeps its blocks in segment 0: never whole
    z = v.create(1, b"z", 0o644, 0, 0).ino
    v.write(z, 0, DATA)
    v.close()
    v = Volume.open(store)
    assert v.wholeness(a).whole and not v.wholeness(z).whole
    b = v.create(1, b"b", 0o644, 0, 0).ino
    v.clone_file(a, b)
    kernel = Kernel()
    pt = Passthrough(os.path.join(store, schema.SEGS_NAME), wanted="", register=kernel.register,
                     unregister=kernel.unregister, negotiated=lambda: {"passthrough": True})
    ops = Operations(v, passthrough=pt)
    yield ops, {"a": a, "b": b, "z": z}, kernel
    pt.close()
    v.close()
    assert fsck(store, verify_data=True).findings == []


def run(fn):
    """Run async fn(nursery) on a mock clock that jumps over sleeps."""
    async def main():
        async with trio.open_nursery() as n:
            await fn(n)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_read_only_opens_of_clones_share_one_registration(fs):
    ops, ino, kernel = fs
    fa, ida = ops.open(ino["a"], os.O_RDONLY, 1)
    fb, idb = ops.open(ino["b"], os.O_RDONLY, 1)
    fa2, ida2 = ops.open(ino["a"], os.O_RDONLY, 2)
    assert ida == idb == ida2 and kernel.opened == 1 and len(kernel.live) == 1
    st = ops.pt.stats()
    assert (st["open_now"], st["opens"], st["backing_files"]) == (3, 3, 1)
    for fh in (fa, fb):
        ops.release(fh)
    assert len(kernel.live) == 1                  # a is still open through it
    ops.release(fa2)
    assert kernel.live == {} and ops.pt.stats()["backing_files"] == 0
    _, again = ops.open(ino["a"], os.O_RDONLY, 1)  # registered anew at the next open
    assert again != ida and kernel.opened == 2


def test_what_takes_the_daemon_path_and_why(fs):
    ops, ino, kernel = fs
    assert isinstance(ops.open(ino["z"], os.O_RDONLY, 1), int)          # segment 0: not whole
    w = ops.open(ino["a"], os.O_WRONLY, 1)
    assert isinstance(w, int)                                           # writes never pass through
    assert isinstance(ops.open(ino["a"], os.O_RDONLY, 2), int)          # ... nor reads beside a writer
    ops.release(w)
    assert isinstance(ops.open(ino["a"], os.O_RDONLY, 3), int)          # a daemon-path reader is still open
    assert isinstance(ops.open(ino["b"], os.O_RDONLY | os.O_TRUNC, 3), int)   # O_TRUNC changes the file
    assert ops.pt.stats()["refusals"] == {"not whole": 1, "open for writing": 1, "open on the daemon path": 1}
    assert kernel.opened == 0


def test_unavailable_passthrough_keeps_every_open_on_the_daemon_path(fs):
    ops, ino, kernel = fs
    ops.pt = Passthrough(ops.pt.segs_folder, wanted="", register=kernel.register, unregister=kernel.unregister,
                         negotiated=lambda: {"passthrough": False, "passthrough_unavailable": "kernel too old"})
    assert isinstance(ops.open(ino["a"], os.O_RDONLY, 1), int)
    st = ops.pt.stats()
    assert st["active"] is False and st["unavailable"] == "kernel too old" and st["refusals"] == {}


def test_a_change_of_a_file_held_in_passthrough_waits_then_fails_with_etxtbsy(fs):
    ops, ino, kernel = fs
    fh, _ = ops.open(ino["a"], os.O_RDONLY, 1)

    async def main(n):
        ops.nursery = n
        for change in (lambda: ops.open(ino["a"], os.O_RDWR, 2),
                       lambda: ops.open(ino["a"], os.O_RDONLY | os.O_TRUNC, 2),
                       lambda: ops.setattr(ino["a"], adapter.SET_SIZE, 0, 0, 0, 0, 0, 0, 0)):
            coro = change()
            assert inspect.iscoroutine(coro)
            start = trio.current_time()
            with pytest.raises(FsError) as e:
                await coro
            assert e.value.errno == errno.ETXTBSY
            assert trio.current_time() - start >= adapter.WRITE_WAIT     # it waited before giving up
        z = ops.open(ino["z"], os.O_RDONLY, 3)                           # clone into it: the same
        with pytest.raises(FsError) as e:
            await ops.setxattr(ino["a"], xattrs.CLONE_FROM.encode(), str(ino["z"]).encode(), 0, 3)
        assert e.value.errno == errno.ETXTBSY
        ops.release(z)
    run(main)
    assert ops.pt.stats()["busy"] == 4
    assert ops.vol.read(ino["a"], 0, len(DATA) + 1) == DATA and ops.vol.wholeness(ino["a"]).whole
    ops.release(fh)


def test_a_change_goes_on_when_the_readers_release_arrives_during_its_wait(fs):
    """The kernel detaches the backing file at close and sends RELEASE later: a writer's OPEN may come first."""
    ops, ino, kernel = fs
    f1, _ = ops.open(ino["a"], os.O_RDONLY, 1)
    f2, _ = ops.open(ino["b"], os.O_RDONLY, 1)
    got = []

    async def main(n):
        ops.nursery = n

        async def writer():
            got.append(await ops.open(ino["a"], os.O_RDWR, 2))
        n.start_soon(writer)
        await trio.sleep(adapter.WRITE_WAIT / 4)
        ops.release(f2)                       # another inode's release: a still waits
        await trio.sleep(adapter.WRITE_WAIT / 4)
        assert got == []
        ops.release(f1)                       # the in-flight RELEASE
    run(main)
    assert len(got) == 1 and isinstance(got[0], int)
    assert ops.pt.stats()["busy"] == 0 and ops.pt.stats()["write_waits"] == 1
    assert ops.write(got[0], 0, b"new") == 3 and not ops.vol.wholeness(ino["a"]).whole
    assert isinstance(ops.open(ino["a"], os.O_RDONLY, 3), int)      # no longer whole: the daemon path
    assert ops.vol.read(ino["b"], 0, 3) == DATA[:3]


def test_an_open_waits_for_queued_writes_of_its_segment(fs, monkeypatch):
    ops, ino, kernel = fs
    queued = iter([True])
    monkeypatch.setattr(ops.vol.data, "queued_in", lambda seg: next(queued, False))
    got = []

    async def main(n):
        ops.nursery = n
        coro = ops.open(ino["a"], os.O_RDONLY, 1)
        assert inspect.iscoroutine(coro)
        got.append(await coro)
    run(main)
    assert isinstance(got[0], tuple) and kernel.opened == 1


def test_the_view_of_the_segments_is_read_only_and_in_no_mount_table(fs, store):
    fd = readonly_view(os.path.join(store, schema.SEGS_NAME))
    try:
        with pytest.raises(OSError) as e:
            os.open("1", os.O_RDWR, dir_fd=fd)
        assert e.value.errno == errno.EROFS
        r = os.open("1", os.O_RDONLY, dir_fd=fd)
        assert os.pread(r, 16, 0) == DATA[:16]
        os.close(r)
        with open("/proc/self/mountinfo") as f:
            assert os.path.join(store, schema.SEGS_NAME) not in f.read()
    finally:
        os.close(fd)


def test_why_passthrough_is_not_asked_for():
    from reflinkfs.fuse.mount import MountOptions, passthrough_refused
    opts = MountOptions(store="s", mountpoint="m")
    assert passthrough_refused(opts, cap_sys_admin=True) == ""
    assert passthrough_refused(opts, cap_sys_admin=False).startswith("not root")
    opts.passthrough = "off"
    assert "--passthrough off" in passthrough_refused(opts, cap_sys_admin=True)
    opts.passthrough, opts.kernel_cache = "auto", True
    assert "--kernel-cache" in passthrough_refused(opts, cap_sys_admin=True)


def test_what_can_be_told_before_mounting():
    from reflinkfs.fuse.passthrough import precheck
    assert precheck(True, "6.18.44-fc") == "" and precheck(True, "weird") == ""
    assert precheck(False, "6.18.44").startswith("not root")
    assert "too old" in precheck(True, "6.1.0-18-amd64")
