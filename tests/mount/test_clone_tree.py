"""`reflinkfs clone -r` as one request to the daemon (core/treeclone.py, adapter._clone_tree): the clone is
the same tree byte for byte, costs one request and moves no data, the kernel's view is right at once, and
a daemon killed in the middle leaves no DST or the whole DST with a clean store."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

from _sharing import BS, counters, delta, status
from mountutil import assert_fsck_clean, cli_cmd, diff_snapshots, run_cli, snapshot, wait_for


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_tree(root) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "top").write_bytes(rnd(5 * BS + 7, 1))
    (root / "a" / "b" / "c" / "empty").write_bytes(b"")
    with open(root / "a" / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(64 * BS)
        f.write(b"tail")
    os.link(root / "top", root / "a" / "b" / "hard")
    (root / "link").symlink_to("a/b/c")
    (root / "dangling").symlink_to("/no/such/path")
    os.mkfifo(root / "a" / "fifo")
    os.mknod(root / "a" / "null", 0o600 | 0o020000, os.makedev(1, 3))
    os.setxattr(root / "top", "user.note", b"kept")
    os.chmod(root / "a" / "b", 0o750)
    subprocess.run(["setfacl", "-m", "u:nobody:rx", str(root / "a")], check=False, capture_output=True)
    for i in range(40):
        (root / "a" / f"f{i:02d}").write_bytes(rnd(i * 100, i))


def test_clone_r_is_one_request_and_the_same_tree(fs, workdir):
    src, dst = workdir / "src", workdir / "dst"
    make_tree(src)
    nlink_before = os.stat(workdir).st_nlink           # the kernel caches the parent's attributes now
    before = counters(fs.mnt)
    ops_before = status(fs.mnt)["extops"]["ops"]
    r = run_cli("clone", "-r", "--json", src, dst)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    out = json.loads(r.stdout)
    moved = delta(before, counters(fs.mnt))
    ops = status(fs.mnt)["extops"]["ops"]
    # one request: the daemon built the tree; no mkdir, create, symlink or mknod came from the command
    assert ops["setxattr"]["requests"] - ops_before["setxattr"]["requests"] == 1
    for op in ("mkdir", "create", "symlink", "mknod", "link"):
        assert ops.get(op, {}).get("requests", 0) == ops_before.get(op, {}).get("requests", 0), op
    assert (moved["bytes_read"], moved["bytes_written"]) == (0, 0), moved
    assert out["entries"] == sum(len(d) + len(f) for _, d, f in os.walk(src))
    assert out["bytes_shared"] == moved["saved_bytes"] > 0 and out["seconds"] >= 0
    diff = diff_snapshots(snapshot(src), snapshot(dst))
    assert diff == "", diff
    assert os.getxattr(dst / "a", "system.posix_acl_access") == os.getxattr(src / "a", "system.posix_acl_access")
    assert os.stat(workdir).st_nlink == nlink_before + 1   # right at once, though the kernel cached it
    assert os.stat(dst / "top").st_ino == os.stat(dst / "a" / "b" / "hard").st_ino
    assert os.stat(dst / "top").st_ino != os.stat(src / "top").st_ino


def test_clone_r_refusals_name_the_problem(fs, workdir):
    src = workdir / "src"
    make_tree(src)
    (workdir / "taken").mkdir()
    r = run_cli("clone", "-r", src, workdir / "taken")
    assert r.returncode != 0 and "exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(workdir / "taken") == []
    r = run_cli("clone", "-r", src, src / "a" / "inside")
    assert r.returncode != 0 and "into itself" in r.stderr
    assert not (src / "a" / "inside").exists()


def test_kill_during_a_tree_clone_leaves_no_dst_or_all_of_it(mounts, tmp_path):
    """Several rounds (REFLINKFS_TREE_CRASH_ROUNDS, default 4): SIGKILL the daemon at a random moment of
    `clone -r` of a tree big enough to take many batches; fsck must be clean, and after a remount DST is
    absent or identical to SRC."""
    store = mounts.store()
    m = mounts.mount(store)
    src = m.mnt / "src"
    src.mkdir()
    for d in range(30):
        sub = src / f"d{d:02d}"
        sub.mkdir()
        for i in range(200):
            (sub / f"f{i:03d}").write_bytes(b"%d-%d" % (d, i) * (i % 7))
    want = snapshot(src)
    m.unmount()
    rng = random.Random(19)
    outcomes = []
    for rnd_no in range(int(os.environ.get("REFLINKFS_TREE_CRASH_ROUNDS", "4"))):
        m = mounts.mount(store)
        dst = m.mnt / f"dst{rnd_no}"
        clone = subprocess.Popen(cli_cmd("clone", "-r", m.mnt / "src", dst), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        # kill once the daemon has built part of the tree (its progress says so), at a random point; or,
        # in some rounds, after the clone returned and a directory fsync committed it: DST must then be whole
        target = rng.randrange(0, 8000) if rnd_no else 10 ** 9        # round 0: after the clone returned
        wait_for(lambda: _entries_done(m.mnt) >= target or clone.poll() is not None, 60, "clone progress")
        if clone.poll() is not None and (rnd_no == 0 or rng.random() < 0.5):
            fd = os.open(m.mnt, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)                                      # commits everything done through the mount
            finally:
                os.close(fd)
            committed = clone.returncode == 0
        else:
            committed = False
        os.kill(m.pid, signal.SIGKILL)
        clone.wait(timeout=60)
        m.force_unmount()
        assert_fsck_clean(store)
        m = mounts.mount(store)
        assert not committed or (m.mnt / f"dst{rnd_no}").exists(), "a committed clone is gone"
        if (m.mnt / f"dst{rnd_no}").exists():
            outcomes.append("complete")
            diff = diff_snapshots(want, snapshot(m.mnt / f"dst{rnd_no}"))
            assert diff == "", diff
        else:
            outcomes.append("absent")
        assert sorted(p for p in os.listdir(m.mnt) if p.startswith(".")) == []
        m.unmount()
    assert "absent" in outcomes and "complete" in outcomes, outcomes


def _entries_done(mnt) -> int:
    st = status(mnt)
    return st.get("tree_clone_entries_done", 0)


def test_dst_parent_answers_while_the_clone_runs(mounts):
    """The request is answered when the clone starts: the kernel holds DST's parent locked until then, so
    a listing of that directory during the clone is answered at once (without DST, which appears only at
    the end), not after the whole clone."""
    from reflinkfs.core.volume import Volume
    store = mounts.store()
    v = Volume.open(str(store))
    src = v.mkdir(1, b"src", 0o755, 0, 0).ino
    for d in range(40):
        sub = v.mkdir(src, b"d%02d" % d, 0o755, 0, 0).ino
        for i in range(1000):
            v.create(sub, b"f%03d" % i, 0o644, 0, 0)
    parent = v.mkdir(1, b"p", 0o755, 0, 0).ino
    v.create(parent, b"other", 0o644, 0, 0)
    v.close()
    m = mounts.mount(store)
    clone = subprocess.Popen(cli_cmd("clone", "-r", m.mnt / "src", m.mnt / "p" / "dst"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _entries_done(m.mnt) > 0 or clone.poll() is not None, 60, "clone progress")
        assert clone.poll() is None, "the clone ended before it could be observed"
        during = os.listdir(m.mnt / "p")
        assert clone.wait(timeout=120) == 0, clone.stderr.read() if clone.stderr else ""
    finally:
        if clone.poll() is None:
            clone.kill()
            clone.wait()
    assert during == ["other"], during
    assert sorted(os.listdir(m.mnt / "p")) == ["dst", "other"]
    assert len(os.listdir(m.mnt / "p" / "dst" / "d39")) == 1000
