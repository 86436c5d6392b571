"""Everyday tools inside the mount give the same trees as on a local disk.

Each test runs one shell script twice: with its working directory in the mount, and in a reference
directory on the local disk; then both trees are compared (contents, modes, owners, symlink targets,
nlink, hard-link groups, user xattrs; not times or inode numbers). `$SRC` is a tree outside both
(files of many sizes, a sparse file, symlinks, hard links, xattrs, odd modes, an empty directory).
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile

import pytest

from mountutil import diff_snapshots, snapshot

GIT_ENV = {"GIT_AUTHOR_DATE": "2020-01-01T00:00:00+0000", "GIT_COMMITTER_DATE": "2020-01-01T00:00:00+0000",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "HOME": "/nonexistent"}
GIT = "git -c user.name=Tester -c user.email=tester@example.com -c init.defaultBranch=main"


def make_source_tree(root) -> None:
    rng = random.Random(11)
    os.makedirs(root / "dir" / "sub" / "deeper")
    os.makedirs(root / "empty")
    for i, size in enumerate([0, 1, 100, 4095, 4096, 4097, 65536 + 3, 300_000, 1 << 20]):
        (root / "dir" / f"f{i}").write_bytes(rng.randbytes(size))
    (root / "dir" / "sub" / "text.txt").write_text("hello\n" * 1000)
    (root / "dir" / "sub" / "deeper" / "x.bin").write_bytes(rng.randbytes(12345))
    with open(root / "sparse", "wb") as f:
        f.seek(8 << 20)
        f.write(b"tail")
        f.seek(10000)
        f.write(b"middle")
    os.chmod(root / "dir" / "f2", 0o755)
    os.chmod(root / "dir" / "f3", 0o600)
    os.chmod(root / "dir" / "f4", 0o4750)
    os.chmod(root / "empty", 0o700)
    os.symlink("f1", root / "dir" / "rel-link")
    os.symlink("../sparse", root / "dir" / "up-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.symlink("dir/sub", root / "dir-link")
    os.link(root / "dir" / "f5", root / "hard-a")
    os.link(root / "dir" / "f5", root / "dir" / "sub" / "hard-b")
    os.setxattr(root / "dir" / "f6", "user.comment", b"a comment")
    os.setxattr(root / "dir" / "f6", "user.binary", bytes(range(256)))
    os.setxattr(root / "dir" / "sub", "user.on-a-dir", b"yes")
    os.mkfifo(root / "fifo", 0o640)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("source")
    make_source_tree(root)
    return root


@pytest.fixture
def run_both(workdir, tmp_path, src):
    """run_both(script) runs `sh -ec script` in the mount and in a local reference directory, and
    returns (mount_dir, ref_dir, [(stdout_mount, stdout_ref)])."""
    ref = tmp_path / "ref"
    ref.mkdir()

    def run(script: str, env: dict | None = None):
        outs = []
        for cwd in (workdir, ref):
            r = subprocess.run(["sh", "-ec", script], cwd=cwd, capture_output=True, text=True, timeout=120,
                               env={**os.environ, "SRC": str(src), "LC_ALL": "C", **(env or {})})
            assert r.returncode == 0, f"in {cwd}: {script}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
            outs.append(r.stdout)
        return workdir, ref, outs
    return run


def assert_same_tree(a, b, **kw) -> None:
    sa, sb = snapshot(a, **kw), snapshot(b, **kw)
    assert sa == sb, f"trees differ ({a} vs {b}):\n" + diff_snapshots(sa, sb)


def test_cp_a(run_both, src):
    mnt, ref, _ = run_both('cp -a "$SRC" copy && cp -a copy copy2 && cp -r "$SRC/dir" plain && '
                           'cp "$SRC/dir/f8" one && cp --sparse=always "$SRC/sparse" sparse2 && '
                           'cp -a --reflink=auto copy/dir/f7 auto')
    assert_same_tree(mnt, ref)
    # the copy is the source, times included (cp -a keeps mtimes, to the nanosecond)
    copy = snapshot(mnt / "copy", times=True)
    orig = snapshot(src, times=True)
    for e in (*copy.values(), *orig.values()):
        if isinstance(e, dict):
            e.pop("atime_ns")
            e.pop("ctime_ns")
    assert copy == orig, diff_snapshots(copy, orig)
    assert snapshot(mnt / "copy2") == snapshot(src)
    # a sparse copy stays sparse in the mount
    assert os.stat(mnt / "sparse2").st_blocks <= 16
    assert (mnt / "sparse2").read_bytes() == (src / "sparse").read_bytes()


def test_tar(run_both, src):
    det = "--sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu"
    mnt, ref, outs = run_both(
        f'tar -S --xattrs -C "$SRC" -cf src.tar . && mkdir x && tar --xattrs -C x -xpf src.tar && '
        f'tar {det} -C x -cf - . | sha256sum && tar -tvf src.tar --numeric-owner | wc -l && '
        f'tar -C x -czf x.tgz dir && mkdir y && tar -C y -xzf x.tgz && '
        f'tar {det} --exclude=./sparse -C x -cf det.tar . && rm src.tar x.tgz')
    out_mnt, out_ref = outs
    assert out_mnt == out_ref, "tar archives of the extracted trees differ"
    assert_same_tree(mnt, ref)
    assert_same_tree(mnt / "x", src)


def test_git(run_both):
    mnt, ref, outs = run_both(
        f'{GIT} init -q repo && cd repo && cp -a "$SRC/dir" . && printf "a\\nb\\n" > file.txt && '
        f'{GIT} add -A && {GIT} commit -q -m first && '
        f'printf "c\\n" >> file.txt && {GIT} mv dir moved && {GIT} commit -q -am second && '
        f'{GIT} rm -q moved/f0 && ln -s file.txt link && {GIT} add link && {GIT} commit -q -m third && '
        f'{GIT} tag v1 && '
        f'{GIT} gc -q && {GIT} fsck --strict --no-progress && '
        f'test -z "$({GIT} status --porcelain)" && '
        f'{GIT} log --format="%H %s" && {GIT} ls-files -s | sha256sum && '
        f'cd .. && {GIT} clone -q repo clone && cd clone && {GIT} log --format=%H -1 && '
        f'{GIT} checkout -q HEAD~1 && ls && cat file.txt',
        env=GIT_ENV)
    out_mnt, out_ref = outs
    assert out_mnt == out_ref
    assert len(out_mnt.splitlines()[0].split()[0]) == 40
    # the work trees match (.git internals hold times and inode numbers, so compare them via git above)
    for sub in ("repo", "clone"):
        a = {k: v for k, v in snapshot(mnt / sub).items() if not k.startswith(".git")}
        b = {k: v for k, v in snapshot(ref / sub).items() if not k.startswith(".git")}
        assert a == b, diff_snapshots(a, b)


def test_python_venv(run_both):
    mnt, ref, outs = run_both(
        '/usr/bin/python3 -m venv --without-pip venv && '
        'mkdir -p pkg && printf "VALUE = 42\\n" > pkg/mod.py && '
        'venv/bin/python -c "import sys; sys.path.insert(0, \'pkg\'); import mod; print(mod.VALUE)" && '
        'venv/bin/python -c "import sys; print(sys.prefix == sys.base_prefix)" && '
        'venv/bin/python -m compileall -q pkg && ls pkg/__pycache__ | wc -l')
    out_mnt, out_ref = outs
    assert out_mnt == out_ref == "42\nFalse\n1\n"
    # the venv embeds its own path; the compiled file embeds the source's mtime
    skip = {p for p in snapshot(mnt) if "__pycache__" in p}
    assert_same_tree(mnt, ref, replace=(os.fsencode(mnt), os.fsencode(ref)), skip=skip)
    r = subprocess.run([str(mnt / "venv" / "bin" / "python"), "-c", "import sys; print(sys.prefix)"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == str(mnt / "venv")


def test_find_du(run_both, src):
    listing = (r"find . \( -type d -printf '%y %M %n %p\n' \) -o -printf '%y %M %n %s %p %l\n' | sort")
    mnt, ref, outs = run_both(
        f'cp -a "$SRC" t && {listing} && find t -name "f*" -type f | sort && '
        'find t -type l | sort && find t -size +100k | sort && find t -empty | sort && '
        'find t -links 3 | sort && find t -perm -4000 | sort && '
        'find t -type f -exec du -l -b --apparent-size {} + | sort -k2 && '
        'find t/dir/sub -depth -delete && find t | sort')
    out_mnt, out_ref = outs
    assert out_mnt == out_ref
    assert not (mnt / "t" / "dir" / "sub").exists() and (mnt / "t" / "dir" / "f0").exists()
    assert_same_tree(mnt, ref)
    # du counts real blocks: the 1 MiB file takes about 1 MiB, the 8 MiB sparse one almost nothing
    def du_k(path):
        return int(subprocess.run(["du", "-k", str(path)], capture_output=True, text=True,
                                  check=True).stdout.split()[0])
    assert 1024 <= du_k(mnt / "t" / "dir" / "f8") <= 1032
    assert du_k(mnt / "t" / "sparse") <= 16
    assert du_k(mnt / "t") >= 1024 + 300
    r = subprocess.run(["du", "-sb", "--apparent-size", str(mnt / "t" / "sparse")], capture_output=True,
                       text=True, check=True)
    assert int(r.stdout.split()[0]) == (8 << 20) + 4


@pytest.fixture
def outside():
    """A directory on another filesystem than both the mount and the reference (/dev/shm, a tmpfs)."""
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="reflinkfs-test-")
    yield d
    shutil.rmtree(d)


def test_ln_mv(run_both, outside):
    # `mv` to and from `outside` crosses filesystems from the mount and from the reference alike
    mnt, ref, outs = run_both(
        'mkdir -p a/b c && echo one > a/f && echo two > a/b/g && '
        'ln a/f a/f-hard && ln -s f a/f-sym && ln -s ../a/b c/b-sym && '
        'echo other > c/x && ln -f a/f c/x && ln -sf b/g a/f-sym && '
        'mv a/b c/ && mv a/f c/moved && mv c/b-sym a/ && '
        'echo new > d && mv -f d c/moved && mv -n a/f-hard c/x && mv a/f-sym a/f-sym-renamed && '
        'mv a c/b/ && mkdir -p "$OUT/$$" && mv c/b/g "$OUT/$$/" && mv "$OUT/$$/g" c/back && '
        'mv c/b "$OUT/$$/dir" && mv "$OUT/$$/dir" c/b-again && '
        'stat -c "%h %n" c/x c/moved c/b-again/a/f-hard && readlink c/b-again/a/b-sym',
        env={"OUT": str(outside)})
    out_mnt, out_ref = outs
    assert out_mnt == out_ref
    assert_same_tree(mnt, ref)
    assert (mnt / "c" / "back").read_text() == "two\n"
    assert out_mnt == "1 c/x\n1 c/moved\n1 c/b-again/a/f-hard\n../a/b\n"
