"""The adapter's commit: the data file's sync runs in a thread, reads are answered meanwhile, and writes
wait for it. Driven under trio without a mount, with a sync that is held until the test lets it go."""
from __future__ import annotations

import os
import threading

import pytest
import trio

from reflinkfs.fuse.adapter import Operations

BS = 4096
ROOT = 1


@pytest.mark.trio
async def test_a_commit_syncs_in_a_thread_while_reads_go_on_and_writes_wait(vol):
    ops = Operations(vol)
    ino = vol.create(ROOT, b"f", 0o644, 0, 0).ino
    vol.write(ino, 0, b"a" * 2 * BS)
    fh = ops._new_handle(ino, os.O_RDWR, 0)
    commits = vol.commits
    entered, release = threading.Event(), threading.Event()
    real_sync = vol.data.sync

    def held_sync():
        entered.set()
        release.wait(timeout=5)        # bounded, so that a sync on the loop's own thread fails the test
        real_sync()
    vol.data.sync = held_sync
    wrote = []

    async def write():
        wrote.append(await ops.write(fh, BS, b"b" * BS))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.commit)
            await trio.to_thread.run_sync(entered.wait)
            assert b"".join(ops.read_parts(fh, 0, 2 * BS)) == b"a" * 2 * BS, "a read during the sync"
            nursery.start_soon(write)
            await trio.sleep(0.05)
            assert wrote == [] and vol.commits == commits, "the write waits for the sync"
            release.set()
    assert wrote == [BS] and vol.commits == commits + 1
    assert vol.dirty and vol.data.unsynced, "the write came after the sync: the next commit covers it"
    vol.data.sync = real_sync
    await ops.commit()
    assert not vol.dirty and vol.read(ino, 0, 2 * BS) == b"a" * BS + b"b" * BS


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
