"""Differential test: one random sequence of operations, applied to the mount and to tmpfs.

After every step the result (value or errno) must be the same on both, and so must the whole tree:
names, types, modes, nlink, sizes, contents, symlink targets and user xattrs. The sequence comes from a
seeded `random.Random`, so a failure names the seed and the step, and replays exactly.

The operations: create (with O_EXCL / O_TRUNC), write at random offsets (also through O_APPEND), read,
truncate, rename (plain, RENAME_NOREPLACE, RENAME_EXCHANGE), link, unlink, mkdir, rmdir, symlink,
readlink, chmod, set/get/list/remove xattrs, and file descriptors kept open across steps (so files
are read and written after they were unlinked or renamed).
"""
from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import tempfile

import pytest

from mountutil import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

STEPS = 300
NAMES = ["a", "b", "c", "dd", "e"]
XNAMES = ["user.x", "user.y", "user.zz"]
MAX_FDS = 3


def tmpfs_dir() -> str:
    # absolute symlink targets must lead nowhere: a create through them would escape both trees
    assert not os.path.exists("/nonexistent-reflinkfs-test")
    with open("/proc/mounts") as f:
        if not any(line.split()[1] == "/dev/shm" and line.split()[2] == "tmpfs" for line in f):
            pytest.skip("/dev/shm is not a tmpfs")
    return tempfile.mkdtemp(dir="/dev/shm", prefix="reflinkfs-diff-")


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


class Side:
    """One of the two filesystems; every operation takes paths relative to its root."""

    def __init__(self, root: str):
        self.root = root
        self.fds: dict[int, int] = {}            # slot -> fd

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def create(self, rel, flags, mode):
        os.close(os.open(self.p(rel), os.O_WRONLY | os.O_CREAT | flags, mode))

    def write(self, rel, off, data, append):
        fd = os.open(self.p(rel), os.O_WRONLY | (os.O_APPEND if append else 0))
        try:
            return os.pwrite(fd, data, off)
        finally:
            os.close(fd)

    def read(self, rel, off, n):
        fd = os.open(self.p(rel), os.O_RDONLY)
        try:
            return os.pread(fd, n, off)
        finally:
            os.close(fd)

    def truncate(self, rel, size):
        os.truncate(self.p(rel), size)

    def rename(self, a, b, flags):
        if flags:
            renameat2(self.p(a), self.p(b), flags)
        else:
            os.rename(self.p(a), self.p(b))

    def link(self, a, b):
        os.link(self.p(a), self.p(b), follow_symlinks=False)

    def unlink(self, rel):
        os.unlink(self.p(rel))

    def mkdir(self, rel, mode):
        os.mkdir(self.p(rel), mode)

    def rmdir(self, rel):
        os.rmdir(self.p(rel))

    def symlink(self, target, rel):
        os.symlink(target, self.p(rel))

    def readlink(self, rel):
        return os.readlink(self.p(rel))

    def chmod(self, rel, mode):
        os.chmod(self.p(rel), mode)

    def setxattr(self, rel, name, value, flags):
        os.setxattr(self.p(rel), name, value, flags)

    def getxattr(self, rel, name):
        return os.getxattr(self.p(rel), name)

    def removexattr(self, rel, name):
        os.removexattr(self.p(rel), name)

    def listxattr(self, rel):
        return own_xattr_names(self.p(rel))

    def stat(self, rel):
        st = os.stat(self.p(rel))
        return (stat.filemode(st.st_mode), st.st_nlink, st.st_size if stat.S_ISREG(st.st_mode) else None)

    # descriptors that stay open across steps
    def fd_open(self, slot, rel, flags):
        if slot in self.fds:
            os.close(self.fds.pop(slot))
        self.fds[slot] = os.open(self.p(rel), os.O_RDWR | flags)

    def fd_write(self, slot, off, data):
        return os.pwrite(self.fds[slot], data, off)

    def fd_read(self, slot, off, n):
        return os.pread(self.fds[slot], n, off)

    def fd_truncate(self, slot, size):
        os.ftruncate(self.fds[slot], size)

    def fd_stat(self, slot):
        st = os.fstat(self.fds[slot])
        return (stat.filemode(st.st_mode), st.st_nlink, st.st_size)

    def fd_close(self, slot):
        os.close(self.fds.pop(slot))

    def close_all(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def own_xattr_names(path) -> list[str]:
    return sorted(n for n in os.listxattr(path, follow_symlinks=False) if not n.startswith("user.reflinkfs."))


def tree(root: str, full: bool = True) -> dict:
    """What is compared (directory sizes and times differ between filesystems): names, types, modes,
    nlink, sizes and link targets always; file contents and xattrs when `full`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            e = [stat.filemode(st.st_mode), st.st_nlink]
            if stat.S_ISREG(st.st_mode):
                e.append(st.st_size)
                if full:
                    with open(p, "rb") as f:
                        e.append(f.read())
            elif stat.S_ISLNK(st.st_mode):
                e.append(os.readlink(p))
            if full and not stat.S_ISLNK(st.st_mode):
                e.append({n: os.getxattr(p, n) for n in own_xattr_names(p)})
            out[os.path.relpath(p, root)] = e
    return out


# operations after which contents or xattrs may have changed without any name, mode or size changing
CHANGES_DATA = {"create", "write", "truncate", "setxattr", "removexattr", "fd_open", "fd_write", "fd_truncate",
                "rename", "link", "unlink"}
FULL_EVERY = 20


class Generator:
    """Draws the next operation, using the reference tree to pick mostly paths that exist."""

    def __init__(self, seed: int, ref_root: str):
        self.rng = random.Random(seed)
        self.ref = ref_root

    def entries(self):
        found = []
        for dirpath, dirnames, filenames in os.walk(self.ref):
            for name in dirnames + filenames:
                found.append(os.path.relpath(os.path.join(dirpath, name), self.ref))
        return found

    def dirs(self):
        return [""] + [e for e in self.entries() if os.path.isdir(os.path.join(self.ref, e))
                       and not os.path.islink(os.path.join(self.ref, e))]

    def path(self, existing: float = 0.7) -> str:
        r = self.rng
        ents = self.entries()
        if ents and r.random() < existing:
            return r.choice(ents)
        parent = r.choice(self.dirs())
        if r.random() < 0.05:
            parent = os.path.join(parent, "missing")
        return os.path.join(parent, r.choice(NAMES))

    def data(self) -> bytes:
        r = self.rng
        n = r.choice([0, 1, 100, 4095, 4096, 4097, r.randrange(0, 12000)])
        return bytes([r.randrange(256)]) * (n // 2) + r.randbytes(n - n // 2)

    def next(self):
        r = self.rng
        op = r.choices(
            ["create", "write", "read", "truncate", "rename", "link", "unlink", "mkdir", "rmdir", "symlink",
             "readlink", "chmod", "setxattr", "getxattr", "removexattr", "listxattr", "stat",
             "fd_open", "fd_write", "fd_read", "fd_truncate", "fd_stat", "fd_close"],
            weights=[8, 14, 6, 5, 8, 4, 5, 5, 3, 2, 1, 3, 4, 2, 2, 1, 2, 3, 5, 3, 2, 2, 2])[0]
        off = r.choice([0, r.randrange(0, 5000), r.randrange(0, 40000), 4096 * r.randrange(0, 10)])
        if op == "create":
            return op, (self.path(0.4), r.choice([0, os.O_EXCL, os.O_TRUNC]), r.choice([0o644, 0o600, 0o755]))
        if op == "write":
            return op, (self.path(0.9), off, self.data(), r.random() < 0.2)
        if op == "read":
            return op, (self.path(0.9), off, r.choice([1, 4096, 20000, 70000]))
        if op == "truncate":
            return op, (self.path(0.9), r.choice([0, r.randrange(0, 50000), 4096 * r.randrange(0, 12)]))
        if op == "rename":
            flags = r.choices([0, RENAME_NOREPLACE, RENAME_EXCHANGE], weights=[6, 1, 2])[0]
            return op, (self.path(0.9), self.path(0.5), flags)
        if op == "link":
            return op, (self.path(0.9), self.path(0.3))
        if op in ("unlink", "rmdir", "readlink", "listxattr", "stat"):
            return op, (self.path(0.85),)
        if op == "mkdir":
            return op, (self.path(0.2), r.choice([0o755, 0o700, 0o2775]))
        if op == "symlink":
            return op, (r.choice(["a", "../b", "/nonexistent-reflinkfs-test/x", "dd/e", "x" * 100]), self.path(0.2))
        if op == "chmod":
            return op, (self.path(0.9), r.choice([0o644, 0o600, 0o755, 0o4755, 0o2755, 0o1777, 0o000, 0o777]))
        if op == "setxattr":
            flags = r.choice([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])
            return op, (self.path(0.9), r.choice(XNAMES), r.randbytes(r.choice([0, 5, 300])), flags)
        if op in ("getxattr", "removexattr"):
            return op, (self.path(0.9), r.choice(XNAMES))
        slot = r.randrange(MAX_FDS)
        if op == "fd_open":
            return op, (slot, self.path(0.9), r.choice([0, 0, os.O_APPEND, os.O_TRUNC]))
        if op == "fd_write":
            return op, (slot, off, self.data())
        if op == "fd_read":
            return op, (slot, off, r.choice([1, 4096, 20000]))
        if op == "fd_truncate":
            return op, (slot, r.randrange(0, 30000))
        return op, (slot,)


@pytest.mark.parametrize("seed,cache,commit_interval", [
    (1, "shared", "5"), (2, "shared", "0.05"), (3, "inode", "5"), (4, "none", "0.05"),
])
def test_same_as_tmpfs(mounts, seed, cache, commit_interval):
    m = mounts.mount(options=["--cache", cache, "--commit-interval", commit_interval])
    ref_root = tmpfs_dir()
    old_umask = os.umask(0o022)
    mnt_side, ref_side = Side(str(m.mnt)), Side(ref_root)
    gen = Generator(seed, ref_root)
    history = []
    try:
        for step in range(STEPS):
            op, args = gen.next()
            shown = tuple(a if not isinstance(a, bytes) or len(a) < 16 else f"<{len(a)} bytes>" for a in args)
            history.append(f"{step}: {op}{shown}")
            if op.startswith("fd_") and op != "fd_open" and args[0] not in ref_side.fds:
                history[-1] += " (skipped: slot not open)"
                continue
            expect = outcome(getattr(ref_side, op), *args)
            got = outcome(getattr(mnt_side, op), *args)
            assert got == expect, (f"seed {seed}, step {step}: {op}{shown}: mount gave {got!r:.300}, "
                                   f"tmpfs gave {expect!r:.300}\nlast steps:\n" + "\n".join(history[-15:]))
            # contents and xattrs are read back after every step that may have changed them (and
            # periodically anyway); names, modes, nlink and sizes after every step
            full = (op in CHANGES_DATA and expect[0] == "ok") or step % FULL_EVERY == 0 or step == STEPS - 1
            a, b = tree(m.mnt, full), tree(ref_root, full)
            assert a == b, (f"seed {seed}, step {step}: trees differ after {op}{shown}:\n"
                            + "\n".join(f"  {k}: mount {a.get(k)!r:.200} tmpfs {b.get(k)!r:.200}"
                                        for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                            + "\nlast steps:\n" + "\n".join(history[-15:]))
        assert len([h for h in history if "skipped" not in h]) > STEPS * 0.8
    finally:
        mnt_side.close_all()
        ref_side.close_all()
        os.umask(old_umask)
        shutil.rmtree(ref_root)
