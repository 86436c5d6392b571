"""Mount points in the way: a dead mount left by a killed daemon (recovered when it is of the same store,
refused with the command that clears it otherwise; `umount` clears it), and a non-empty directory
(refused unless asked for with --nonempty / -o nonempty, whose old contents come back after unmount).

Every test that makes a dead mount registers it with the `dead` fixture, which detaches whatever is still
mounted there at teardown, before the `mounts` fixture unmounts and checks the rest.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mountutil import assert_fsck_clean, cli_cmd, fusermount, is_mounted, lock_holders, run_cli, wait_for
from test_cli_mount import assert_one_line_error

HERE = Path(__file__).resolve().parent


@pytest.fixture
def dead(mounts):
    """`dead.add(mnt)`: at teardown, lazily detach every mount still on mnt (dead or not), whatever happened.
    (It depends on `mounts`, so it is torn down first: `mounts` then finds these mount points clear.)"""
    class Dead:
        def __init__(self):
            self.points: list[Path] = []

        def add(self, mnt) -> Path:
            self.points.append(Path(mnt))
            return Path(mnt)
    d = Dead()
    try:
        yield d
    finally:
        for mnt in d.points:
            for _ in range(10):
                if not is_mounted(mnt):
                    break
                fusermount(mnt, lazy=True, timeout=30)


def kill9(m) -> None:
    """SIGKILL the daemon of Mount m and wait until it is gone: its mount stays, dead."""
    os.kill(m.pid, signal.SIGKILL)
    assert m.wait_daemon_exit(30)
    wait_for(lambda: not lock_holders(m.store), 10, "the killed daemon to let go of the store")
    with pytest.raises(OSError) as e:
        os.statvfs(m.mnt)
    assert e.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)   # the latter when caught in the abort
    assert is_mounted(m.mnt)


def durable_file(path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)        # commits: the file survives the kill
    finally:
        os.close(fd)


def mountinfo_count(mnt) -> int:
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        return sum(1 for line in f if line.split()[4] == target)


# -- kill -9, then mount again ---------------------------------------------------------------------
@pytest.mark.parametrize("foreground", [False, True])
def test_mount_again_after_kill9_recovers(mounts, dead, foreground):
    store = mounts.store()
    m = mounts.mount(store, options=["--commit-interval", "3600"])
    dead.add(m.mnt)
    data = os.urandom(300_000)
    os.mkdir(m.path("dir"))
    durable_file(m.path("committed"), data)      # its fsync commits the mkdir too
    m.path("not-committed").write_bytes(b"lost with the daemon")
    kill9(m)

    if foreground:
        proc = subprocess.Popen(cli_cmd("mount", store, m.mnt, "--foreground", "--log", m.log_path),
                                stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = proc.stderr.readline()
            second = proc.stderr.readline()           # "mounted ..." once the mount is live
            assert second.startswith(f"mounted {store} on {m.mnt}"), (first, second)
            assert os.statvfs(m.mnt)                  # live: no longer ENOTCONN
            m2 = mounts.adopt(store, m.mnt)
            assert m2.pid == proc.pid
            assert m2.path("committed").read_bytes() == data
            assert m2.path("dir").is_dir()
            assert not m2.path("not-committed").exists()
            assert mountinfo_count(m.mnt) == 1, "the dead mount is still underneath"
            m2.unmount()
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                fusermount(m.mnt, lazy=True)
                proc.kill()
                proc.wait()
        line = first.strip()
    else:
        r = run_cli("mount", store, m.mnt)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        (line,) = r.stderr.strip().splitlines()
        m2 = mounts.adopt(store, m.mnt)
        assert m2.path("committed").read_bytes() == data
        assert m2.path("dir").is_dir()
        assert not m2.path("not-committed").exists()
        assert mountinfo_count(m.mnt) == 1, "the dead mount is still underneath"
        m2.unmount()
    assert line.startswith("reflinkfs mount:") and "died" in line and "detached" in line, line
    assert not is_mounted(m.mnt)
    assert_fsck_clean(store)


def test_two_mounts_racing_on_a_dead_mount(mounts, dead):
    """The store lock decides: exactly one of two `reflinkfs mount` started together recovers and mounts;
    the other fails with one line; the mount point holds one live mount. A few rounds, since the
    interleaving differs from round to round."""
    store = mounts.store()
    m = mounts.mount(store)
    dead.add(m.mnt)
    for round_ in range(3):
        kill9(m)
        procs = [subprocess.Popen(cli_cmd("mount", store, m.mnt), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [(p.wait(120), *p.communicate()) for p in procs]
        assert sorted(rc for rc, _, _ in outs) == [0, 1], outs
        for rc, out, err in outs:
            assert "Traceback" not in err, err
            if rc:
                assert len(err.strip().splitlines()) == 1, err
        assert mountinfo_count(m.mnt) == 1, f"round {round_}: {outs}"
        os.statvfs(m.mnt)                                   # the one mount there is live
        m = mounts.adopt(store, m.mnt)
    m.unmount()
    assert_fsck_clean(store)


# -- umount of a dead mount ------------------------------------------------------------------------
def test_umount_clears_a_dead_mount(mounts, dead):
    store = mounts.store()
    m = mounts.mount(store)
    dead.add(m.mnt)
    durable_file(m.path("f"), b"committed")
    os.mkdir(m.path("d"))
    sleeper = subprocess.Popen(["sleep", "600"], cwd=m.path("d"))   # keeps the dead mount busy
    try:
        kill9(m)
        r = run_cli("umount", m.mnt)
        assert r.returncode == 0, r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert "died" in line and "detached" in line and str(m.mnt) in line, line
        assert not is_mounted(m.mnt)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert_fsck_clean(store)
    m2 = mounts.mount(store, m.mnt)                 # an ordinary mount: nothing in the way any more
    assert m2.path("f").read_bytes() == b"committed"
    m2.unmount()


# -- refusals --------------------------------------------------------------------------------------
def test_dead_mount_of_another_store_is_refused(mounts, dead):
    a, b = mounts.store(), mounts.store()
    m = mounts.mount(a)
    dead.add(m.mnt)
    kill9(m)
    line = assert_one_line_error(run_cli("mount", b, m.mnt), str(m.mnt), str(a), f"reflinkfs umount {m.mnt}")
    assert "dead" in line
    assert_one_line_error(run_cli("mount", b, m.mnt, "--foreground"), f"reflinkfs umount {m.mnt}")
    assert not lock_holders(b) and mountinfo_count(m.mnt) == 1
    # the command the error gives fixes it
    assert run_cli("umount", m.mnt).returncode == 0
    mb = mounts.mount(b, m.mnt)
    mb.unmount()


def test_dead_mount_of_a_store_mounted_elsewhere_is_refused(mounts, dead):
    store = mounts.store()
    m = mounts.mount(store)
    dead.add(m.mnt)
    kill9(m)
    live = mounts.mount(store)                      # the store mounted again, on another directory
    assert_one_line_error(run_cli("mount", store, m.mnt), "in use", f"mounted on {live.mnt}",
                          f"reflinkfs umount {live.mnt}")
    assert mountinfo_count(m.mnt) == 1 and lock_holders(store) == [live.pid]
    live.path("f").write_text("the live mount is unharmed")
    live.unmount()
    # with that one unmounted, mounting on the dead mount point recovers
    r = run_cli("mount", store, m.mnt)
    assert r.returncode == 0, r.stderr
    m2 = mounts.adopt(store, m.mnt)
    assert m2.path("f").read_text() == "the live mount is unharmed"
    m2.unmount()


def test_dead_mount_whose_store_is_held_is_refused(mounts, dead):
    """A process other than a daemon holds the store (as fsck does): the dead mount is left alone."""
    store = mounts.store()
    m = mounts.mount(store)
    dead.add(m.mnt)
    kill9(m)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, sys\n"
                               f"fd = os.open({str(store / 'lock')!r}, os.O_RDWR)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\nsys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert_one_line_error(run_cli("mount", store, m.mnt), str(store), "in use", str(holder.pid))
        assert mountinfo_count(m.mnt) == 1
    finally:
        holder.kill()
        holder.wait()
    r = run_cli("mount", store, m.mnt)
    assert r.returncode == 0, r.stderr
    mounts.adopt(store, m.mnt).unmount()


def test_dead_mount_of_another_filesystem_is_refused(mounts, dead, tmp_path):
    store = mounts.store()
    mnt = dead.add(tmp_path / "toy")
    mnt.mkdir()
    toy = subprocess.Popen([sys.executable, str(HERE / "_toyfs.py"), str(mnt), str(tmp_path / "toy.log"), "normal"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: is_mounted(mnt) or toy.poll() is not None, 30, "the toy filesystem to mount")
        assert toy.poll() is None, "the toy filesystem failed to mount"
        line = assert_one_line_error(run_cli("mount", store, mnt), str(mnt), "unmount it first")
        assert "already mounted" in line
        toy.kill()
        toy.wait()
        line = assert_one_line_error(run_cli("mount", store, mnt), str(mnt), f"fusermount3 -uz {mnt}")
        assert "dead" in line
        assert mountinfo_count(mnt) == 1 and not lock_holders(store)
        assert subprocess.run(["fusermount3", "-uz", str(mnt)]).returncode == 0
    finally:
        if toy.poll() is None:
            toy.kill()
            toy.wait()
    m = mounts.mount(store, mnt)
    m.unmount()


def test_mount_over_a_live_mount_is_refused(mounts):
    m = mounts.mount()
    assert_one_line_error(run_cli("mount", m.store, m.mnt), str(m.mnt), "already mounted")
    other = mounts.store()
    assert_one_line_error(run_cli("mount", other, m.mnt), str(m.mnt), "already mounted", str(m.store),
                          f"reflinkfs umount {m.mnt}")
    assert lock_holders(m.store) == [m.pid] and mountinfo_count(m.mnt) == 1 and not lock_holders(other)


# -- non-empty mount points ------------------------------------------------------------------------
@pytest.mark.parametrize("how", [["-o", "nonempty"], ["-o", "nonempty,default_permissions"], ["--nonempty"]])
def test_nonempty_mountpoint(mounts, tmp_path, how):
    store = mounts.store()
    mnt = tmp_path / "full"
    mnt.mkdir()
    (mnt / "old").write_text("under the mount")
    line = assert_one_line_error(run_cli("mount", store, mnt), "not empty", "--nonempty")
    assert "-o nonempty" in line
    assert not is_mounted(mnt) and not lock_holders(store)

    m = mounts.mount(store, mnt, foreground=False, options=how)
    assert os.listdir(mnt) == [], "the old contents must be hidden while mounted"
    m.path("new").write_text("in the store")
    m.unmount()
    assert sorted(os.listdir(mnt)) == ["old"]
    assert (mnt / "old").read_text() == "under the mount"
    m = mounts.mount(store, mnt, options=how)        # foreground too; the store kept its file
    assert os.listdir(mnt) == ["new"]
    m.unmount()
