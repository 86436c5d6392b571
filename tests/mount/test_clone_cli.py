"""`reflinkfs clone`: share every extent of a file (or, with -r, of a tree) or fail; never copy bytes.

It is the always-or-fail counterpart of `cp --reflink=always`, which cannot work on FUSE (the kernel
refuses FICLONE). It reaches the daemon through the write-only `user.reflinkfs.clone-from` attribute;
the daemon accepts it only from a process that holds the source open for reading, so the kernel's
permission checks at open time decide who may clone what.

Refusals are one line on stderr and a non-zero exit, and leave nothing behind.
"""
from __future__ import annotations

import errno
import os
import pwd
import random
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from _sharing import BS, assert_shared, block_map, counters, delta
from mountutil import diff_snapshots, run_cli, snapshot

REPO = Path(__file__).resolve().parents[2]
TEST_USER = "reflinkfs-test"


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def clone(*args) -> None:
    r = run_cli("clone", *args)
    assert r.returncode == 0, f"reflinkfs clone {args} failed: {r.stderr}"
    assert r.stderr == "" and "Traceback" not in r.stdout


def refused(*args, says: str) -> str:
    """Run `reflinkfs clone ARGS`; it must fail with one line naming the problem."""
    r = run_cli("clone", *args)
    out = r.stdout + r.stderr
    assert r.returncode != 0, f"reflinkfs clone {args} succeeded"
    assert "Traceback" not in out, out
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and r.stdout == "", f"not one line: {out!r}"
    assert lines[0].startswith("reflinkfs clone: ") and says in lines[0], lines[0]
    return lines[0]


def test_clone_shares_every_block_and_moves_no_data(fs, workdir):
    src = workdir / "src"
    data = rnd(10 * BS + 123, 1)
    src.write_bytes(data)
    os.chmod(src, 0o640)
    before = counters(fs.mnt)
    clone(src, workdir / "dst")
    moved = delta(before, counters(fs.mnt))
    assert (moved["bytes_read"], moved["bytes_written"], moved["bytes_served"]) == (0, 0, 0), moved
    assert moved["saved_bytes"] == 11 * BS, moved
    assert_shared(src, workdir / "dst")
    assert (workdir / "dst").read_bytes() == data
    assert stat.S_IMODE(os.stat(workdir / "dst").st_mode) == 0o640
    # into an existing directory: the clone takes the source's name, as with cp
    (workdir / "into").mkdir()
    clone(src, workdir / "into")
    assert_shared(src, workdir / "into" / "src", refcount=3)


def test_clone_of_empty_and_holey_files(fs, workdir):
    (workdir / "empty").write_bytes(b"")
    clone(workdir / "empty", workdir / "empty2")
    assert (workdir / "empty2").read_bytes() == b"" and block_map(workdir / "empty2") == {}
    with open(workdir / "holey", "wb") as f:
        f.write(b"a" * 10)
        f.seek(50 * BS)
        f.write(b"b" * 10)
    clone(workdir / "holey", workdir / "holey2")
    assert block_map(workdir / "holey2") == block_map(workdir / "holey")
    assert sorted(block_map(workdir / "holey2")) == [0, 50]
    assert (workdir / "holey2").read_bytes() == (workdir / "holey").read_bytes()


def test_force_replaces_an_existing_file(fs, workdir):
    src, dst = workdir / "src", workdir / "dst"
    src.write_bytes(rnd(3 * BS + 5, 2))
    dst.write_bytes(rnd(20 * BS, 3))
    old = dst.read_bytes()
    assert os.stat(dst).st_size == 20 * BS            # the kernel now caches dst's attributes
    refused(src, dst, says="exists")
    assert dst.read_bytes() == old
    clone("--force", src, dst)
    # size and contents are right at once, although the kernel had cached the old attributes
    assert os.stat(dst).st_size == 3 * BS + 5
    assert dst.read_bytes() == src.read_bytes()
    assert_shared(src, dst)
    small = workdir / "small"
    small.write_bytes(b"tiny")
    clone("-f", src, small)
    assert small.read_bytes() == src.read_bytes()
    assert_shared(src, small, refcount=3)


def _make_tree(root: Path) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    files = {"top": 5 * BS, "a/one": 1, "a/b/block": BS, "a/b/c/odd": 7 * BS + 99, "a/b/c/empty": 0}
    for i, (name, size) in enumerate(files.items()):
        (root / name).write_bytes(rnd(size, 10 + i))
    os.chmod(root / "a" / "one", 0o600)
    os.chmod(root / "a" / "b" / "block", 0o755)
    os.chmod(root / "a" / "b", 0o750)
    (root / "link-file").symlink_to("a/one")
    (root / "a" / "link-dir").symlink_to("b/c")
    (root / "dangling").symlink_to("no/such/target")
    (root / "absolute").symlink_to("/etc/hostname")


def test_clone_r_clones_a_tree(fs, workdir):
    src = workdir / "tree"
    _make_tree(src)
    before = counters(fs.mnt)
    clone("-r", src, workdir / "copy")
    moved = delta(before, counters(fs.mnt))
    assert (moved["bytes_read"], moved["bytes_written"]) == (0, 0), moved
    assert moved["saved_bytes"] == (5 + 1 + 1 + 8) * BS, moved
    diff = diff_snapshots(snapshot(src), snapshot(workdir / "copy"))
    assert diff == "", diff
    for dirpath, _, filenames in os.walk(src):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                assert_shared(p, workdir / "copy" / p.relative_to(src))
    assert os.readlink(workdir / "copy" / "a" / "link-dir") == "b/c"
    assert (workdir / "copy" / "a" / "link-dir").is_symlink()
    # -r onto an existing tree needs --force, which merges and replaces
    refused("-r", src, workdir / "copy", says="exists")
    (workdir / "copy" / "top").write_bytes(b"changed")
    (workdir / "copy" / "extra").write_bytes(b"kept")
    clone("-r", "--force", src, workdir / "copy")
    assert (workdir / "copy" / "top").read_bytes() == (src / "top").read_bytes()
    assert (workdir / "copy" / "extra").read_bytes() == b"kept"
    assert_shared(src / "top", workdir / "copy" / "top")


def test_refusals_are_one_line_and_leave_nothing(fs, workdir, tmp_path, mounts):
    src = workdir / "src"
    src.write_bytes(rnd(2 * BS, 4))
    (workdir / "dir").mkdir()
    (workdir / "dir" / "f").write_bytes(b"x")
    (workdir / "exists").write_bytes(b"old")
    outside = tmp_path / "outside"
    outside.write_bytes(b"outside")
    other = mounts.mount()

    before = sorted(os.listdir(workdir))
    refused(src, workdir / "exists", says="exists (use --force")
    assert (workdir / "exists").read_bytes() == b"old"
    refused(outside, workdir / "from-outside", says="not inside a reflinkfs mount")
    refused(src, tmp_path / "to-outside", says="not")
    assert not (tmp_path / "to-outside").exists()
    refused(src, other.path("to-other"), says="not on the same reflinkfs mount")
    assert os.listdir(other.mnt) == []
    refused(workdir / "dir", workdir / "dir2", says="is a directory (use -r)")
    # a tree into itself would be scanned while it grows (nested copies until ENAMETOOLONG)
    refused("-r", workdir / "dir", workdir / "dir" / "copy", says="cannot clone a directory into itself")
    refused("-r", "--force", workdir / "dir", workdir / "dir", says="cannot clone a directory into itself")
    assert os.listdir(workdir / "dir") == ["f"]
    refused(workdir / "missing", workdir / "m2", says="No such file")
    refused(src, workdir / "no" / "such" / "dir", says="no")
    assert sorted(os.listdir(workdir)) == before
    assert block_map(src)[0][1] == 1, "nothing was shared"


# -- permissions --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_user():
    """An unprivileged user (created for the test and removed after, unless it existed already)."""
    if shutil.which("setpriv") is None or shutil.which("useradd") is None:
        pytest.skip("needs setpriv and useradd")
    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    created = False
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", TEST_USER], check=True,
                       capture_output=True)
        created = True
        pw = pwd.getpwnam(TEST_USER)
    try:
        yield pw
    finally:
        if created:
            subprocess.run(["userdel", TEST_USER], capture_output=True)


@pytest.fixture
def shared_dir():
    """A directory everyone can traverse (pytest's tmp directories are private to root)."""
    d = tempfile.mkdtemp(prefix="reflinkfs-clone-perm-")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


_PYTHONPATH = [str(REPO)]


def _as_user(pw, *argv) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=60, cwd="/",
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": _PYTHONPATH[0],
                               "LC_ALL": "C.UTF-8"})


def _user_python(pw) -> str:
    """An interpreter the user may run (the venv's may live under root's private home)."""
    for py in (sys.executable, "/usr/bin/python3"):
        r = _as_user(pw, py, "-c", "import reflinkfs.commands")
        if r.returncode == 0:
            return py
    pytest.fail("no Python interpreter that the unprivileged user can run reflinkfs with")


def test_clone_needs_read_permission_on_the_source(test_user, shared_dir, mounts, public_pythonpath):
    _PYTHONPATH[0] = public_pythonpath
    m = mounts.mount(mounts.store(), shared_dir / "mnt", options=["-o", "allow_other"])
    os.chmod(m.mnt, 0o755)
    secret = m.path("secret")
    secret.write_bytes(rnd(3 * BS, 5))
    os.chmod(secret, 0o600)
    drop = m.path("drop")
    drop.mkdir()
    os.chmod(drop, 0o1777)
    mine = drop / "mine"
    mine.write_bytes(b"readable by all")
    os.chmod(mine, 0o644)
    py = _user_python(test_user)

    # the user reaches the mount (allow_other) and may clone what it can read
    r = _as_user(test_user, py, "-m", "reflinkfs.cli", "clone", mine, drop / "ok")
    assert r.returncode == 0, r.stderr
    assert os.stat(drop / "ok").st_uid == test_user.pw_uid
    assert (drop / "ok").read_bytes() == b"readable by all"

    # ... but not a file it cannot read: one line, and no destination at all
    r = _as_user(test_user, py, "-m", "reflinkfs.cli", "clone", secret, drop / "stolen")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "ermission denied" in r.stderr, r.stderr
    assert not (drop / "stolen").exists()

    # going around the command: name the secret inode in clone-from on a file it owns, while holding
    # a file it may read open. The daemon must refuse, and the destination must stay empty.
    attack = (f"import os\n"
              f"keep = os.open({str(mine)!r}, os.O_RDONLY)\n"
              f"fd = os.open({str(drop / 'stolen2')!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n"
              f"try:\n"
              f"    os.setxattr(fd, 'user.reflinkfs.clone-from', b'{os.stat(secret).st_ino}')\n"
              f"except OSError as e:\n"
              f"    print(e.errno)\n"
              f"else:\n"
              f"    print('cloned')\n")
    r = _as_user(test_user, py, "-c", attack)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(errno.EBADF), r.stdout + r.stderr
    assert (drop / "stolen2").read_bytes() == b""
    assert block_map(secret)[0][1] == 1 and block_map(drop / "stolen2") == {}

    # and reading the secret itself is refused by the kernel, as it should be
    r = _as_user(test_user, py, "-c", f"open({str(secret)!r}, 'rb')")
    assert r.returncode != 0 and "PermissionError" in r.stderr


def test_clone_r_names_the_entry_the_caller_may_not_read(test_user, shared_dir, mounts, public_pythonpath):
    """clone -r checks every entry as `cp -r` would need, in the daemon, with the caller's credentials;
    a refusal names the entry and leaves no destination."""
    _PYTHONPATH[0] = public_pythonpath
    m = mounts.mount(mounts.store(), shared_dir / "mnt", options=["-o", "allow_other"])
    os.chmod(m.mnt, 0o755)
    drop = m.path("drop")
    drop.mkdir()
    os.chmod(drop, 0o777)     # not sticky: in a sticky directory only its owner may set user.* attributes
    tree = m.path("tree")
    (tree / "sub").mkdir(parents=True)
    os.chmod(tree, 0o755)
    os.chmod(tree / "sub", 0o755)
    (tree / "sub" / "ok").write_bytes(b"readable")
    secret = tree / "sub" / "secret"
    secret.write_bytes(rnd(2 * BS, 6))
    os.chmod(secret, 0o600)
    py = _user_python(test_user)
    r = _as_user(test_user, py, "-m", "reflinkfs.cli", "clone", "-r", tree, drop / "copy")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "sub/secret" in lines[0] and "cannot read" in lines[0], lines[0]
    assert not (drop / "copy").exists() and os.listdir(drop) == []
    os.chmod(secret, 0o644)
    r = _as_user(test_user, py, "-m", "reflinkfs.cli", "clone", "-r", tree, drop / "copy")
    assert r.returncode == 0, r.stderr
    assert (drop / "copy" / "sub" / "secret").read_bytes() == secret.read_bytes()
    assert os.stat(drop / "copy" / "sub" / "secret").st_uid == test_user.pw_uid   # the caller's, as with cp
