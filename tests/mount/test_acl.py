"""POSIX ACLs on a real mount: setfacl/getfacl, enforcement by the kernel, default ACLs, chmod, remount.

The mount asks for FUSE_POSIX_ACL: the kernel checks permissions against ACLs itself (it reads them with
getxattr and caches them), and the daemon keeps them and the mode consistent and applies default ACLs
(core/acl.py). The same commands run in a directory on the local disk (when it supports ACLs) must give
the same getfacl output: that is the reference, not our reading of POSIX.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mountutil import assert_fsck_clean
from test_permissions import as_other, other, public  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(shutil.which("setfacl") is None, reason="setfacl (Debian package acl) missing")

# A shell script of ACL changes, run in a fresh directory; a name made by the other user's steps is absent.
SCRIPT = r"""
set -e
umask 022
touch f; setfacl -m u:nobody:rw f
touch c; setfacl -m u:nobody:rwx,g:nogroup:r c; chmod 640 c
touch x; setfacl -m u:nobody:r,g:nogroup:w x; setfacl -x u:nobody x
touch b; setfacl -m u:nobody:r b; setfacl -b b
touch m; setfacl -m u::rwx,g::r,o::- m
mkdir d; setfacl -d -m u:nobody:rwx,g::rx,o::- d
mkdir d/sub; touch d/file; mkfifo d/fifo; ln -s file d/link
mkdir -m 700 d/private; umask 077; touch d/umasked; umask 022
touch d/later; chmod 604 d/later
mkdir e; setfacl -d -m u::rwx,g::rwx,o::rwx e; touch e/plain; mkdir e/dir
setfacl -k d/sub
"""


def run_script(root: Path) -> None:
    r = subprocess.run(["sh", "-c", SCRIPT], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def acl_state(root: Path) -> dict:
    """getfacl of every name, and which ACL attributes each one has stored (ls -l shows the `+`)."""
    r = subprocess.run(["getfacl", "-R", "-P", "."], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stored = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            if not p.is_symlink():
                stored[str(p.relative_to(root))] = sorted(n for n in os.listxattr(p) if n.startswith("system."))
    return {"getfacl": sorted(r.stdout.split("\n\n")), "stored": stored,
            "modes": {k: oct(os.lstat(root / k).st_mode) for k in stored}}


@pytest.fixture
def local_acl_dir(tmp_path):
    d = tmp_path / "local"
    d.mkdir()
    if subprocess.run(["setfacl", "-m", "u:nobody:r", str(d)], capture_output=True).returncode != 0:
        pytest.skip("the local disk does not support ACLs: nothing to compare with")
    subprocess.run(["setfacl", "-b", str(d)], check=True)
    return d


def test_setfacl_and_getfacl_as_on_the_local_disk(workdir, local_acl_dir):
    run_script(local_acl_dir)
    run_script(workdir)
    want, got = acl_state(local_acl_dir), acl_state(workdir)
    assert got["modes"] == want["modes"]
    assert got["stored"] == want["stored"]
    assert got["getfacl"] == want["getfacl"]


def test_acls_are_read_back_and_survive_remount_and_cp_a(mounts):
    store = mounts.store()
    m = mounts.mount(store)
    run_script(m.mnt)
    before = acl_state(m.mnt)
    assert before["stored"]["f"] == ["system.posix_acl_access"]
    assert before["stored"]["d"] == ["system.posix_acl_default"]
    subprocess.run(["cp", "--reflink=auto", "-a", "d", "d.copy"], cwd=m.mnt, check=True)
    subprocess.run(["cp", "--reflink=auto", "-a", "f", "f.copy"], cwd=m.mnt, check=True)
    m.unmount()
    m = mounts.mount(store, m.mnt)
    after = acl_state(m.mnt)
    for k in ("modes", "stored"):
        assert {n: v for n, v in after[k].items() if ".copy" not in n} == before[k]
    assert [s for s in after["getfacl"] if ".copy" not in s] == before["getfacl"]
    for name in ("f", "d", "d/file", "d/sub"):
        copy = name.replace("d", "d.copy", 1) if name.startswith("d") else name + ".copy"
        assert after["stored"][copy] == after["stored"][name]
        assert after["modes"][copy] == after["modes"][name]
        got = subprocess.run(["getfacl", "-c", copy], cwd=m.mnt, capture_output=True, text=True).stdout
        assert got == subprocess.run(["getfacl", "-c", name], cwd=m.mnt, capture_output=True, text=True).stdout
    m.unmount()
    assert_fsck_clean(store)


# Run as the other user: `probe OP PATH`, prints OK [...] or ERR <errno name>.
PROBE = r"""
import errno, os, stat, sys
op, path = sys.argv[1], sys.argv[2]
try:
    out = ""
    if op == "read":
        with open(path, "rb") as f:
            out = str(len(f.read()))
    elif op == "write":
        with open(path, "ab") as f:
            f.write(b"w")
    elif op == "create":                 # umask 077: a default ACL, when there is one, replaces it
        os.umask(0o077)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        out = oct(stat.S_IMODE(os.stat(path).st_mode))
    elif op == "tmpfile":
        os.umask(0o027)
        fd = os.open(path, os.O_TMPFILE | os.O_RDWR, 0o666)
        st = os.fstat(fd)
        out = "%o %d %d" % (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        os.close(fd)
    print("OK", out)
except OSError as e:
    print("ERR", errno.errorcode.get(e.errno, e.errno))
"""


def probe(other, op, path) -> str:  # noqa: F811
    r = as_other(other, other[2], "-c", PROBE, op, path)
    assert r.returncode == 0 and r.stdout.strip(), f"probe {op} failed to run: {r.stdout}{r.stderr}"
    return r.stdout.strip()


def setfacl(*args) -> None:
    subprocess.run(["setfacl", *map(str, args)], check=True)


def test_acls_are_enforced_for_another_user(public, mounts, other):  # noqa: F811
    uid, gid, _ = other
    m = mounts.mount(mounts.store(), public / "mnt", options=["-o", "allow_other"])
    mnt = m.mnt
    (mnt / "secret").write_bytes(b"s" * 100)
    os.chmod(mnt / "secret", 0o600)
    assert probe(other, "read", mnt / "secret") == "ERR EACCES"        # the mode alone refuses
    setfacl("-m", f"u:{uid}:r", mnt / "secret")
    assert probe(other, "read", mnt / "secret") == "OK 100"            # the ACL entry lets them read
    assert probe(other, "write", mnt / "secret") == "ERR EACCES"       # ... and only read
    os.chmod(mnt / "secret", 0o600)                                     # the mask follows chmod: ---
    assert probe(other, "read", mnt / "secret") == "ERR EACCES"
    setfacl("-m", "m::r", mnt / "secret")
    assert probe(other, "read", mnt / "secret") == "OK 100"

    (mnt / "open").write_bytes(b"o" * 10)
    os.chmod(mnt / "open", 0o644)
    assert probe(other, "read", mnt / "open") == "OK 10"                # the mode alone allows
    setfacl("-m", f"u:{uid}:-", mnt / "open")
    assert probe(other, "read", mnt / "open") == "ERR EACCES"          # the ACL entry refuses them
    setfacl("-x", f"u:{uid}", mnt / "open")
    assert probe(other, "read", mnt / "open") == "OK 10"


def test_default_acls_for_another_users_new_files(public, mounts, other):  # noqa: F811
    uid, gid, _ = other
    m = mounts.mount(mounts.store(), public / "mnt", options=["-o", "allow_other"])
    mnt = m.mnt
    (mnt / "shared").mkdir()
    os.chmod(mnt / "shared", 0o750)
    assert probe(other, "create", mnt / "shared" / "nope") == "ERR EACCES"
    setfacl("-m", f"u:{uid}:rwx", mnt / "shared")
    setfacl("-d", "-m", f"u:{uid}:rwx,u::rwx,g::rx,o::rx", mnt / "shared")
    # their umask 077 is replaced by the default ACL: 0666 masked by it
    assert probe(other, "create", mnt / "shared" / "theirs") == "OK 0o664"
    st = os.stat(mnt / "shared" / "theirs")
    assert (st.st_uid, st.st_gid) == (uid, gid)
    acl = subprocess.run(["getfacl", "-c", "-n", mnt / "shared" / "theirs"], capture_output=True, text=True).stdout
    assert f"user:{uid}:rwx\t#effective:rw-" in acl.splitlines(), acl
    # root's file there is readable by them through the inherited entry, whatever root's umask
    old = os.umask(0o077)
    try:
        (mnt / "shared" / "roots").write_bytes(b"r" * 7)
    finally:
        os.umask(old)
    assert probe(other, "read", mnt / "shared" / "roots") == "OK 7"
    # O_TMPFILE: the caller's uid and gid, mode & ~umask without a default ACL, masked by it with one
    (mnt / "pub").mkdir()
    os.chmod(mnt / "pub", 0o777)
    assert probe(other, "tmpfile", mnt / "pub") == f"OK 640 {uid} {gid}"
    assert probe(other, "tmpfile", mnt / "shared") == f"OK 664 {uid} {gid}"
