"""The `mount` and `umount` commands: every user error is one line on stderr and a non-zero exit,
never a traceback and never a mount or a store lock left behind; signals unmount cleanly."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from mountutil import (assert_fsck_clean, cli_cmd, is_mounted, lock_holders, mkfs, need_fuse, pid_alive,
                       run_cli, wait_for)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode != 0, f"expected a failure, got exit 0: {r.stdout}{r.stderr}"
    assert "Traceback" not in r.stdout + r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{r.stderr}"
    assert lines[0].startswith("reflinkfs"), lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def fresh(tmp_path):
    """An unmounted fresh store and an empty mountpoint."""
    need_fuse()
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mkfs(store)
    mnt.mkdir()
    yield store, mnt
    assert not is_mounted(mnt), "a failed mount left a mount behind"
    assert not lock_holders(store), "a failed mount left a process holding the store"


def test_second_mount_of_a_store_is_refused(mounts, tmp_path):
    m = mounts.mount()
    other = tmp_path / "other"
    other.mkdir()
    r = run_cli("mount", m.store, other)
    assert_one_line_error(r, "in use")
    assert not is_mounted(other)
    r = run_cli("mount", m.store, other, "--foreground")
    assert_one_line_error(r, "in use")
    assert not is_mounted(other)
    # the first mount is unharmed
    m.path("f").write_bytes(b"still here")
    assert m.path("f").read_bytes() == b"still here"
    assert lock_holders(m.store) == [m.pid]


def test_mount_errors(fresh, tmp_path):
    store, mnt = fresh
    r = run_cli("mount", tmp_path / "no-such-store", mnt)
    assert_one_line_error(r, "no-such-store")
    (tmp_path / "not-a-store").mkdir()
    assert_one_line_error(run_cli("mount", tmp_path / "not-a-store", mnt), "not-a-store")
    (tmp_path / "a-file").write_text("x")
    assert_one_line_error(run_cli("mount", tmp_path / "a-file", mnt), "a-file")
    # mountpoints
    assert_one_line_error(run_cli("mount", store, tmp_path / "no-such-dir"), "no-such-dir")
    assert_one_line_error(run_cli("mount", store, tmp_path / "a-file"), "a-file")
    (mnt / "something").write_text("x")
    assert_one_line_error(run_cli("mount", store, mnt), "not empty")
    assert_one_line_error(run_cli("mount", store, mnt, "--foreground"), "not empty")
    os.unlink(mnt / "something")
    # usage errors
    assert_one_line_error(run_cli("mount", store), "mountpoint")
    assert_one_line_error(run_cli("mount", store, mnt, "--cache", "bogus"), "bogus")
    assert_one_line_error(run_cli("mount", store, mnt, "--cache-size", "lots"), "lots")
    # an option the FUSE library rejects fails cleanly too, and leaves nothing behind
    r = run_cli("mount", store, mnt, "-o", "no_such_fuse_option")
    assert_one_line_error(r, "log")
    assert not is_mounted(mnt)
    r = run_cli("mount", store, mnt, "-o", "no_such_fuse_option", "--foreground")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert not is_mounted(mnt)
    wait_for(lambda: not lock_holders(store), 10, "the failed daemon to release the store")
    assert_fsck_clean(store)


def test_mount_on_a_mountpoint_in_use(mounts, tmp_path):
    m = mounts.mount()
    store2 = mounts.store()
    assert_one_line_error(run_cli("mount", store2, m.mnt), str(m.mnt))
    assert not lock_holders(store2)


def test_umount_errors(fresh, tmp_path, mounts):
    store, mnt = fresh
    assert_one_line_error(run_cli("umount", mnt), "not a reflinkfs mount")
    assert_one_line_error(run_cli("umount", tmp_path / "missing"), "missing")
    # busy: a process has its working directory inside
    m = mounts.mount(store, mnt)
    os.mkdir(m.path("d"))
    sleeper = subprocess.Popen(["sleep", "60"], cwd=m.path("d"))
    try:
        assert_one_line_error(run_cli("umount", m.mnt), "busy")
        assert is_mounted(m.mnt)
        m.path("d", "f").write_text("the mount still works")
    finally:
        sleeper.kill()
        sleeper.wait()
    m.unmount()
    assert not is_mounted(mnt)


def test_sigterm_unmounts_cleanly(mounts):
    store = mounts.store()
    m = mounts.mount(store, foreground=False, options=["--commit-interval", "3600"])
    data = os.urandom(200_000)
    m.path("written-before").write_bytes(data)          # not fsynced: the unmount must commit it
    os.mkdir(m.path("dir"))
    os.kill(m.pid, signal.SIGTERM)
    wait_for(lambda: not is_mounted(m.mnt), 30, "SIGTERM to unmount")
    wait_for(lambda: not pid_alive(m.pid), 30, "the daemon to exit")
    assert not lock_holders(store)
    assert_fsck_clean(store)
    log = m.log()
    assert "Traceback" not in log and "signal" in log, log
    m2 = mounts.mount(store, m.mnt)
    assert m2.path("written-before").read_bytes() == data
    assert m2.path("dir").is_dir()


@pytest.mark.parametrize("how", ["umount", "SIGINT"])   # SIGTERM: test_sigterm_unmounts_cleanly
def test_foreground(fresh, how):
    store, mnt = fresh
    proc = subprocess.Popen(cli_cmd("mount", store, mnt, "--foreground"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt):
            assert proc.poll() is None, f"exited with {proc.returncode}: {proc.communicate()}"
            assert time.monotonic() < deadline, "not mounted after 30 s"
            time.sleep(0.01)
        (mnt / "f").write_text("foreground")
        assert lock_holders(store) == [proc.pid]
        if how == "umount":
            r = run_cli("umount", mnt)
            assert r.returncode == 0, r.stderr
        else:
            proc.send_signal(getattr(signal, how))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert f"mounted {store} on {mnt}" in err
    assert not is_mounted(mnt)
    assert not lock_holders(store)
    assert_fsck_clean(store)
    # and the data is in the store
    proc = subprocess.run(cli_cmd("mount", store, mnt), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    try:
        assert (mnt / "f").read_text() == "foreground"
    finally:
        assert run_cli("umount", mnt).returncode == 0
