"""Mounting the way Linux mounts: `mount -t fuse.reflinkfs`, an fstab line, and the system's `umount`.

mount(8) finds its helper only in /sbin, so the `sbin_helper` fixture installs /sbin/mount.fuse.reflinkfs
(the wrapper `make install` writes, running this environment) for the module and removes it afterwards,
putting back whatever was there. fstab entries are read from a temporary file (`mount --fstab`), never
from /etc/fstab. The route through fuse3's own /sbin/mount.fuse3 needs nothing installed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mountutil import assert_fsck_clean, is_mounted, lock_holders, need_fuse, pid_alive, wait_for
from reflinkfs import cli, mounthelper

VENV_BIN = str(Path(sys.executable).parent)
DATA = os.urandom(300_000)


@pytest.fixture(scope="module")
def sbin_helper():
    need_fuse()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs mount(8) and root")
    sbin = os.path.realpath("/sbin")
    path = Path(sbin, mounthelper.PROG)
    saved = (path.read_bytes(), path.stat().st_mode) if path.exists() else None
    mounthelper.install(sbin, VENV_BIN)
    try:
        yield path
    finally:
        if saved is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(saved[0])
            path.chmod(saved[1])


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, **kw)


def status(mnt) -> dict:
    return json.loads(os.getxattr(mnt, "user.reflinkfs.status"))


def system_umount(m) -> None:
    """`umount MNT`, then the daemon must commit and exit by itself (nothing waits for it here)."""
    r = run("umount", m.mnt)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(m.mnt)
    wait_for(lambda: not pid_alive(m.pid), 60, "the daemon to commit and exit after umount")
    assert not lock_holders(m.store)


def test_mount_t_and_fstab_and_system_umount(sbin_helper, mounts, tmp_path):
    store = mounts.store()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # commit_interval=3600: only the commit at unmount can make the data durable
    opts = (f"cache=inode,cache_size=64M,commit_interval=3600,_netdev,nofail,noauto,"
            f"x-systemd.requires-mounts-for={tmp_path},comment=test")
    r = run("mount", "-t", "fuse.reflinkfs", store, mnt, "-o", opts)
    assert r.returncode == 0, r.stderr
    m = mounts.adopt(store, mnt)
    c = status(mnt)["cache"]
    assert (c["mode"], c["budget_bytes"]) == ("inode", 64 << 20), c
    (mnt / "f").write_bytes(DATA)
    os.mkdir(mnt / "d")
    system_umount(m)
    assert_fsck_clean(store)

    fstab = tmp_path / "fstab"
    fstab.write_text(f"# a test fstab\n{store} {mnt} fuse.reflinkfs "
                     f"defaults,_netdev,nofail,x-systemd.requires-mounts-for={tmp_path},kernel_cache 0 0\n")
    r = run("mount", "--fstab", fstab, mnt)
    assert r.returncode == 0, r.stderr
    m = mounts.adopt(store, mnt)
    assert status(mnt)["kernel_cache"] is True
    assert (mnt / "f").read_bytes() == DATA and (mnt / "d").is_dir()
    system_umount(m)
    assert_fsck_clean(store)


def test_mount_t_failure_leaves_nothing(sbin_helper, mounts, tmp_path):
    store = mounts.store()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for opts in ("no_such_fuse_option", "cache=bogus", "cache_size", "kernel_cache=1"):
        r = run("mount", "-t", "fuse.reflinkfs", store, mnt, "-o", opts)
        assert r.returncode in (1, 32), (opts, r.returncode, r.stderr)     # usage error, mount failure
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not is_mounted(mnt)
        wait_for(lambda: not lock_holders(store), 10, "the failed daemon to release the store")
    (mnt / "x").write_text("x")
    r = run("mount", "-t", "fuse.reflinkfs", store, mnt)
    assert r.returncode == 32 and "nonempty" in r.stderr, r.stderr
    r = run("mount", "-t", "fuse.reflinkfs", store, mnt, "-o", "nonempty")
    assert r.returncode == 0, r.stderr
    m = mounts.adopt(store, mnt)
    assert not (mnt / "x").exists()
    system_umount(m)
    assert (mnt / "x").read_text() == "x"


def test_mount_fuse3_route(mounts, tmp_path):
    """Without /sbin/mount.fuse.reflinkfs, mount(8) runs fuse3's mount.fuse3, which runs
    `reflinkfs STORE MNT -o OPTS` from PATH after dropping _netdev, nofail, noauto."""
    need_fuse()
    helper = shutil.which("mount.fuse3", path="/sbin:/usr/sbin")
    if helper is None:
        pytest.skip("fuse3's mount.fuse3 is not installed")
    store = mounts.store()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}
    r = run(helper, store, mnt, "-t", "fuse.reflinkfs", "-o", "cache=none,commit_interval=3600,_netdev,nofail",
            env=env)
    assert r.returncode == 0, r.stderr
    m = mounts.adopt(store, mnt)
    assert status(mnt)["cache"]["mode"] == "none"
    (mnt / "f").write_bytes(DATA)
    system_umount(m)
    assert_fsck_clean(store)
    r = run(helper, store, mnt, "-t", "fuse.reflinkfs", env=env)
    assert r.returncode == 0, r.stderr
    m = mounts.adopt(store, mnt)
    assert (mnt / "f").read_bytes() == DATA


def test_every_mount_option_has_an_o_form():
    """Each option of `reflinkfs mount` is reachable through -o, and translates to what the parser takes."""
    args = cli.parse_args(["mount", "S", "M"])
    defaults = vars(args)
    covered = {"store", "mountpoint", "fuse_options", "cmd", "handler"}   # handler: the dispatch, no option
    for name, (flag, takes_value) in mounthelper.TABLE.items():
        value = {"cache": "inode", "cache_size": "1G", "commit_interval": "2.5", "log": "/tmp/l",
                 "passthrough": "off"}.get(name)
        argv = mounthelper.translate([f"{name}={value}" if takes_value else name])
        parsed = vars(cli.parse_args(["mount", "S", "M", *argv]))
        changed = {k for k in parsed if parsed[k] != defaults[k]}
        assert len(changed) == 1, (name, changed)
        covered |= changed
    assert covered == set(defaults), f"mount options without an -o form: {set(defaults) - covered}"
    assert vars(cli.parse_args(["mount", "S", "M", *mounthelper.translate(["cache_size=1G"])]))["cache_size"] == 1 << 30
    # what only mount(8), mount.fuse3 or systemd act on is dropped; the rest goes to libfuse
    assert mounthelper.translate(["rw,_netdev,nofail,noauto,defaults,x-systemd.automount,comment=x,"
                                  "allow_other,nodev"]) == ["-o", "rw,allow_other,nodev"]


def test_helper_command_line():
    parse = mounthelper.parse
    assert parse(["/s", "/m", "-o", "a,b", "-n", "-v", "-t", "fuse.reflinkfs"]) == \
        ("/s", "/m", ["a,b"], {"fake": False, "verbose": True})
    assert parse(["/s", "/m", "-fv"])[3] == {"fake": True, "verbose": True}
    for bad in (["/s"], ["-o", "x", "/s", "/m"], ["/s", "/m", "-t", "fuse.sshfs"], ["/s", "/m", "-N", "1"],
                ["/s", "/m", "-o"], ["/s", "/m", "extra"]):
        with pytest.raises(mounthelper.UsageError):
            parse(bad)


GENERATOR = "/lib/systemd/system-generators/systemd-fstab-generator"


def test_boot_the_way_systemd_mounts(sbin_helper, mounts, tmp_path):
    """The documented fstab line through systemd-fstab-generator (runnable without systemd running: it
    reads $SYSTEMD_FSTAB), then the command the generated mount unit runs: systemd drops nofail, noauto
    and auto and runs `mount WHAT WHERE -t TYPE -o OPTIONS` (systemd's mount.c)."""
    if not os.access(GENERATOR, os.X_OK):
        pytest.skip("systemd-fstab-generator is not installed")
    store = mounts.store()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{store} {mnt} fuse.reflinkfs nofail,x-systemd.requires-mounts-for={store},"
                     f"cache_size=64M,commit_interval=3600 0 0\n")
    out = tmp_path / "units"
    dirs = [out / d for d in ("normal", "early", "late")]
    for d in dirs:
        d.mkdir(parents=True)
    r = run(GENERATOR, *dirs, env={**os.environ, "SYSTEMD_FSTAB": str(fstab), "SYSTEMD_LOG_LEVEL": "err"})
    assert r.returncode == 0, r.stderr
    units = list(dirs[0].glob("*.mount"))
    assert len(units) == 1, r.stderr
    unit = dict(line.split("=", 1) for line in units[0].read_text().splitlines() if "=" in line)
    assert unit["RequiresMountsFor"] == str(store) and unit["Type"] == "fuse.reflinkfs"
    assert (dirs[0] / "local-fs.target.wants" / units[0].name).exists()     # local, not _netdev
    opts = ",".join(o for o in unit["Options"].split(",") if o not in ("nofail", "noauto", "auto"))
    r = run("mount", unit["What"], unit["Where"], "-t", unit["Type"], "-o", opts)
    assert r.returncode == 0, r.stderr
    m = mounts.adopt(store, mnt)
    assert status(mnt)["cache"]["budget_bytes"] == 64 << 20
    (mnt / "f").write_bytes(DATA)
    system_umount(m)                  # what stopping the unit runs: umount WHERE
    r = run("mount", "--fstab", fstab, mnt)
    assert r.returncode == 0, r.stderr
    m = mounts.adopt(store, mnt)
    assert (mnt / "f").read_bytes() == DATA
