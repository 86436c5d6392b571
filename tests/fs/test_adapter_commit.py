"""The adapter's commit: the data file's syncs run in threads, reads are answered meanwhile, and writes wait
only for the second sync. Driven under trio without a mount, with syncs held until the test lets them go."""
from __future__ import annotations

import inspect
import os
import threading

import pytest
import trio

from reflinkfs.fuse.adapter import Operations

BS = 4096
ROOT = 1


@pytest.mark.trio
async def test_a_commit_syncs_twice_in_threads_first_with_writes_going_on_then_with_writes_waiting(vol):
    ops = Operations(vol)
    ino = vol.create(ROOT, b"f", 0o644, 0, 0).ino
    vol.write(ino, 0, b"a" * 2 * BS)
    fh = ops._new_handle(ino, os.O_RDWR, 0)
    commits = vol.commits
    entered, release = [threading.Event(), threading.Event()], [threading.Event(), threading.Event()]
    calls = []
    real_sync = vol.data.sync

    def held_sync():                   # held after it synced: a write meanwhile is one it did not cover
        k = len(calls)
        calls.append(threading.current_thread() is threading.main_thread())
        real_sync()
        if k < 2:
            entered[k].set()
            release[k].wait(timeout=5)  # bounded, so that a sync on the loop's own thread fails the test
    vol.data.sync = held_sync
    wrote = []

    async def write(off, fill):
        r = ops.write(fh, off, fill * BS)             # the count now, or a coroutine: it has to wait
        wrote.append(await r if inspect.iscoroutine(r) else r)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.commit)
            assert await trio.to_thread.run_sync(entered[0].wait, 10)
            assert b"".join(ops.read(fh, 0, 2 * BS)) == b"a" * 2 * BS, "a read during the first sync"
            await write(BS, b"b")
            assert wrote == [BS] and vol.commits == commits, "a write during the first sync goes on"
            release[0].set()
            assert await trio.to_thread.run_sync(entered[1].wait, 10), "a second sync, for that write"
            nursery.start_soon(write, 2 * BS, b"c")
            await trio.sleep(0.05)
            assert wrote == [BS] and vol.commits == commits, "a write during the second sync waits"
            release[1].set()
    assert wrote == [BS, BS] and vol.commits == commits + 1
    assert calls == [False, False], "both syncs ran in threads, and the loop's own sync had nothing to do"
    assert vol.dirty and vol.data.unsynced, "the last write came after the second sync: the next commit has it"
    vol.data.sync = real_sync
    await ops.commit()
    assert not vol.dirty and vol.read(ino, 0, 3 * BS) == b"a" * BS + b"b" * BS + b"c" * BS


@pytest.mark.trio
async def test_a_commit_with_no_write_during_its_first_sync_syncs_once(vol):
    ops = Operations(vol)
    ino = vol.create(ROOT, b"f", 0o644, 0, 0).ino
    vol.write(ino, 0, b"a" * BS)
    calls = []
    real_sync = vol.data.sync

    def counted_sync():
        calls.append(1)
        real_sync()
    vol.data.sync = counted_sync
    await ops.commit()
    assert calls == [1] and not vol.dirty and vol.read(ino, 0, BS) == b"a" * BS


@pytest.mark.trio
async def test_an_fsync_with_nothing_new_waits_until_the_last_commit_is_durable(vol):
    ops = Operations(vol)
    vol.create(ROOT, b"f", 0o644, 0, 0)
    release = threading.Event()
    real_sync_meta = vol.sync_meta

    def held_sync_meta():
        release.wait(timeout=5)
        real_sync_meta()
    vol.sync_meta = held_sync_meta
    assert vol.commit(wait=False) is not None    # e.g. the periodic commit: its WAL sync still runs
    assert not vol.dirty
    answered = []

    async def fsync():
        await ops.commit()
        answered.append(True)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fsync)
            await trio.sleep(0.1)
            assert answered == [], "answered before the commit it relies on was durable"
            release.set()
    assert answered == [True]
    assert vol.commit(wait=False) is None
