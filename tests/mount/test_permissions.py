"""Permissions on a real mount, checked by a second, unprivileged user.

reflinkfs mounts with default_permissions, so the kernel checks modes. Another user cannot read or clone a
0600 file of root's, cannot write a read-only file (not by write, truncate or a clone onto it), and cannot
reach the mount at all unless it was mounted with `-o allow_other`. The store directory is 0700. And a range
that is newly allocated (posix_fallocate) or exposed by growing a file never shows bytes of a deleted file.

The other user runs the system's python3 (the test's interpreter may live where that user cannot go) with
`setpriv --reuid --regid --clear-groups`; it is created with `useradd -M -s /usr/sbin/nologin` if missing.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mountutil import is_mounted, mkfs, run_cli

USER = "reflinkfs-other"
BS = 4096
MIB = 1 << 20
REPO = Path(__file__).resolve().parents[2]

# Run as the other user: `probe OP PATH [ARG]`, prints OK [...] or ERR <errno name>.
PROBE = r"""
import errno, os, sys
op, path, arg = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
def zeros_report(data):
    bad = next((i for i, b in enumerate(data) if b), None)
    return "ZEROS %d" % len(data) if bad is None else "NONZERO at %d: %r" % (bad, data[bad:bad + 16])
try:
    out = ""
    if op == "stat":
        os.stat(path)
    elif op == "list":
        os.listdir(path)
    elif op == "read":
        with open(path, "rb") as f:
            out = str(len(f.read()))
    elif op == "write":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, arg.encode())
        os.close(fd)
    elif op == "truncate":
        os.truncate(path, int(arg))
    elif op == "clone-xattr":            # what `reflinkfs clone` does: src open for reading, xattr on dst
        fd = os.open(arg, os.O_RDONLY)
        os.setxattr(path, "user.reflinkfs.clone-from", str(os.fstat(fd).st_ino).encode())
        os.close(fd)
    elif op == "falloc":                 # a new file, posix_fallocate'd: must read as zeros
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.posix_fallocate(fd, 0, int(arg))
        out = zeros_report(os.pread(fd, int(arg) + 1, 0))
        os.close(fd)
    elif op == "extend":                 # 100 bytes written, then grown by truncate: the rest is zeros
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"h" * 100)
        os.ftruncate(fd, int(arg))
        out = zeros_report(os.pread(fd, int(arg) + 1, 100))
        os.close(fd)
    elif op == "past-eof":               # one byte written far past EOF: the gap is zeros
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        os.pwrite(fd, b"e", int(arg))
        out = zeros_report(os.pread(fd, int(arg), 0))
        os.close(fd)
    else:
        raise SystemExit("unknown op " + op)
    print("OK", out)
except OSError as e:
    print("ERR", errno.errorcode.get(e.errno, e.errno))
"""


@pytest.fixture(scope="module")
def other():
    """(uid, gid, python) of an unprivileged second user."""
    if os.geteuid() != 0:
        pytest.skip("switching users needs root")
    for tool in ("setpriv", "useradd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    python = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin")
    if python is None:
        pytest.skip("no system python3 for the second user")
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        r = subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", USER], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        pw = pwd.getpwnam(USER)
    assert pw.pw_uid != 0
    return pw.pw_uid, pw.pw_gid, python


def as_other(other, *cmd, env=None) -> subprocess.CompletedProcess:
    uid, gid, _ = other
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *map(str, cmd)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/",
                          env=env or {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})


def probe(other, op, path, arg=None) -> str:
    r = as_other(other, other[2], "-c", PROBE, op, path, *([] if arg is None else [arg]))
    assert r.returncode == 0 and r.stdout.strip(), f"probe {op} failed to run: {r.stdout}{r.stderr}"
    return r.stdout.strip()


@pytest.fixture
def public():
    """A directory every user can traverse (pytest's own temp dirs are root-only), for mountpoints."""
    d = Path(tempfile.mkdtemp(prefix="reflinkfs-perm-"))
    os.chmod(d, 0o755)
    yield d
    # never recurse into something that might still be mounted: stores are removed, mountpoints rmdir'ed
    for sub in d.iterdir():
        if is_mounted(sub):
            continue
        if sub.name.startswith("store"):           # the store, and the mount's output file beside it
            if sub.is_dir():
                shutil.rmtree(sub, ignore_errors=True)
            else:
                sub.unlink()
        else:
            try:
                os.rmdir(sub)
            except OSError:
                pass
    try:
        os.rmdir(d)
    except OSError:
        pass


def test_store_directory_is_private(public, mounts, other):
    store = public / "store"                  # in a directory everyone may traverse
    mkfs(store)
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700
    m = mounts.mount(store, public / "mnt", options=["-o", "allow_other"])
    (m.mnt / "f").write_bytes(b"secret")
    os.chmod(m.mnt / "f", 0o644)
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700
    assert probe(other, "read", m.mnt / "f") == "OK 6"   # through the mount, by its mode
    assert probe(other, "list", store) == "ERR EACCES"    # but never around it, through the store
    assert probe(other, "read", store / "data") == "ERR EACCES"
    assert probe(other, "read", store / "meta.db") == "ERR EACCES"


def test_no_access_without_allow_other(public, mounts, other):
    m = mounts.mount(mounts.store(), public / "mnt")
    (m.mnt / "f").write_bytes(b"x")
    os.chmod(m.mnt / "f", 0o644)
    assert probe(other, "stat", public) == "OK"
    assert probe(other, "stat", m.mnt) == "ERR EACCES"
    assert probe(other, "stat", m.mnt / "f") == "ERR EACCES"
    assert probe(other, "read", m.mnt / "f") == "ERR EACCES"
    assert (m.mnt / "f").read_bytes() == b"x"             # the owner of the mount still can


def test_modes_are_enforced_for_another_user(public, mounts, other, public_pythonpath):
    uid, gid, _ = other
    m = mounts.mount(mounts.store(), public / "mnt", options=["-o", "allow_other"])
    mnt = m.mnt
    assert probe(other, "stat", mnt) == "OK"
    (mnt / "pub").mkdir()
    os.chmod(mnt / "pub", 0o777)
    secret, ro = b"s" * (3 * BS), b"r" * (2 * BS)
    (mnt / "secret").write_bytes(secret)
    os.chmod(mnt / "secret", 0o600)
    (mnt / "ro").write_bytes(ro)
    os.chmod(mnt / "ro", 0o644)

    assert probe(other, "read", mnt / "secret") == "ERR EACCES"
    assert probe(other, "read", mnt / "ro") == f"OK {len(ro)}"
    assert probe(other, "write", mnt / "ro", "overwrite") == "ERR EACCES"
    assert probe(other, "truncate", mnt / "ro", "0") == "ERR EACCES"
    # their own files work, and are theirs
    assert probe(other, "write", mnt / "pub" / "mine", "mine") == "OK"
    st = os.stat(mnt / "pub" / "mine")
    assert (st.st_uid, st.st_gid) == (uid, gid)
    # no clone of what they cannot read, nor onto what they cannot write
    assert probe(other, "clone-xattr", mnt / "pub" / "mine", mnt / "secret") == "ERR EACCES"
    assert probe(other, "clone-xattr", mnt / "ro", mnt / "pub" / "mine") == "ERR EACCES"
    cli = [other[2], "-c", "import sys; from reflinkfs.cli import main; sys.exit(main(sys.argv[1:]))"]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": public_pythonpath}
    assert probe(other, "stat", Path(public_pythonpath) / "reflinkfs" / "cli.py") == "OK"
    r = as_other(other, *cli, "clone", mnt / "secret", mnt / "pub" / "stolen", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "Permission denied" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (mnt / "pub" / "stolen").exists()
    r = as_other(other, *cli, "clone", "--force", mnt / "pub" / "mine", mnt / "ro", env=env)
    assert r.returncode == 1 and "Permission denied" in r.stderr, r.stderr
    assert (mnt / "secret").read_bytes() == secret
    assert (mnt / "ro").read_bytes() == ro
    assert (mnt / "pub" / "mine").read_bytes() == b"mine"
    # root (the mount's owner, and the superuser) still reads everything
    r = run_cli("clone", mnt / "secret", mnt / "secret.copy")
    assert r.returncode == 0 and (mnt / "secret.copy").read_bytes() == secret


def phys_blocks(path) -> set[int]:
    r = run_cli("stat", "--json", path)
    assert r.returncode == 0, r.stderr
    out = set()
    for _lb, pb, n, _rc in json.loads(r.stdout)[str(path)]["extents"]:
        out.update(range(pb, pb + n))
    return out


def test_new_ranges_never_show_deleted_bytes(public, mounts, other, monkeypatch):
    # files packed into segment 0, whose freed runs any file's next allocation may reuse (a file's own
    # segment is new and empty, and only its owner writes into it)
    monkeypatch.setenv("REFLINKFS_SMALL_FILE_BYTES", str(1 << 62))
    m = mounts.mount(mounts.store("--size", "64M"), public / "mnt", options=["-o", "allow_other"])
    mnt = m.mnt
    (mnt / "pub").mkdir()
    os.chmod(mnt / "pub", 0o777)
    size = 2 * MIB

    def delete_and_commit(path):
        """Unlink, wait until statfs shows the blocks free (the daemon frees an inode when the kernel
        forgets it), then commit, so that the next allocation may reuse them."""
        before = os.statvfs(mnt).f_bfree
        nblocks = os.stat(path).st_blocks * 512 // BS
        os.unlink(path)
        deadline = time.monotonic() + 10
        while os.statvfs(mnt).f_bfree < before + nblocks:
            assert time.monotonic() < deadline, "the blocks of a deleted file were not released"
            time.sleep(0.01)
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)

    old = (b"DELETED-SECRET-" + bytes(range(1, 250))) * (size // 264 + 1)
    fd = os.open(mnt / "old", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, old[:size])
    os.fsync(fd)
    os.close(fd)
    freed = phys_blocks(mnt / "old")
    assert len(freed) == size // BS
    delete_and_commit(mnt / "old")                     # the blocks are free for reuse now

    assert probe(other, "falloc", mnt / "pub" / "falloc", size) == f"OK ZEROS {size}"
    reused = phys_blocks(mnt / "pub" / "falloc") & freed
    assert len(reused) >= size // BS // 2, "the allocation did not reuse the freed blocks; the test proves nothing"
    delete_and_commit(mnt / "pub" / "falloc")
    assert probe(other, "extend", mnt / "pub" / "extend", size) == f"OK ZEROS {size - 100}"
    assert phys_blocks(mnt / "pub" / "extend") & freed, "the first block should reuse a freed one"
    assert probe(other, "past-eof", mnt / "pub" / "gap", MIB) == f"OK ZEROS {MIB}"
    # shrinking inside a block and growing again exposes zeros, not the bytes cut off
    p = mnt / "pub" / "shrink"
    p.write_bytes(old[:BS])
    os.truncate(p, 10)
    os.truncate(p, BS)
    assert p.read_bytes() == old[:10] + bytes(BS - 10)
