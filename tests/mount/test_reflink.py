"""cp --reflink inside the mount: copies share extents, and a clone is a copy in every other respect.

What the kernel allows (see DESIGN.md, "Reflinks through FUSE"): copy_file_range(2) reaches the daemon,
FICLONE / FICLONERANGE / FIDEDUPERANGE fail with EOPNOTSUPP inside the kernel. GNU cp >= 9.0 tries
FICLONE and then copy_file_range, so `cp --reflink=auto` and plain `cp` share extents here, and
`cp --reflink=always` fails.

A copy with the right bytes proves nothing by itself: if the daemon answered ENOSYS the kernel would copy
the bytes with reads and writes. So every sharing test also reads the mount's counters (clone requests,
data-file bytes read and written) and the extent maps.

copy_file_range edge cases are run on the mount and on a file in the test's tmp directory (a local
filesystem) with the same calls; both must give the same results and bytes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import random
import shutil
import stat
import struct
import subprocess
import threading

import pytest

from _sharing import BS, XATTR_EXTENTS, XATTR_STATUS, assert_shared, block_map, counters, delta, extents, status
from mountutil import run_cli

pytestmark = pytest.mark.skipif(shutil.which("cp") is None, reason="needs GNU cp")

FICLONE = 0x40049409
FICLONERANGE = 0x4020940D
FIDEDUPERANGE = 0xC0189436
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.copy_file_range.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int,
                                  ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t, ctypes.c_uint]
_libc.copy_file_range.restype = ctypes.c_ssize_t


def copy_file_range_flags(fd_in: int, fd_out: int, n: int, flags: int) -> int:
    """copy_file_range(2) with flags, which os.copy_file_range does not pass."""
    r = _libc.copy_file_range(fd_in, None, fd_out, None, n, flags)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def punch_hole(fd: int, off: int, n: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, n) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def write_file(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def cli_ok(*args) -> str:
    r = run_cli(*args)
    assert r.returncode == 0, f"reflinkfs {args}: {r.stderr}"
    return r.stdout


def cp(*args) -> None:
    r = subprocess.run(["cp", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"cp {args}: {r.stderr}"


@pytest.fixture(scope="module", autouse=True)
def _copy_file_range_is_served(fs):
    """Everything below depends on the daemon serving copy_file_range; say so once, plainly."""
    st = status(fs.mnt)
    assert st["copy_file_range_handled"] is True, f"copy_file_range is not handled by the mount: {st}"


# -- cp shares ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [256 * BS, 3 * BS + 1000, 100])
@pytest.mark.parametrize("cp_args", [["--reflink=auto"], []], ids=["reflink-auto", "plain"])
def test_cp_shares_extents_and_moves_no_data(fs, workdir, cp_args, size):
    src, dst = workdir / "src", workdir / "dst"
    data = rnd(size, size)
    write_file(src, data)
    before = counters(fs.mnt)
    cp(*cp_args, src, dst)
    moved = delta(before, counters(fs.mnt))

    # The daemon answered the copy (no kernel fallback) and touched no file data: no data-file byte
    # read or written, nothing served through the read path. With direct_io the kernel has no dirty
    # pages of these files to flush, so the data-file counters hold exactly still.
    assert moved["clones"] >= 1 and moved["cloned_bytes"] == size, moved
    assert (moved["bytes_read"], moved["bytes_written"], moved["bytes_served"]) == (0, 0, 0), moved
    # every block, the partial last block too, is one physical block referenced by both files
    assert_shared(src, dst)
    assert moved["saved_bytes"] == -(-size // BS) * BS
    info = json.loads(cli_ok("stat", "--json", src, dst))
    assert info[str(src)]["extents"] == info[str(dst)]["extents"]
    assert info[str(dst)]["shared_bytes"] == -(-size // BS) * BS and info[str(dst)]["exclusive_bytes"] == 0
    assert read_file(dst) == data


def test_cp_a_tree_shares_every_file(fs, workdir):
    src = workdir / "tree"
    sizes = {"empty": 0, "one": 1, "small": 100, "a/b/almost": BS - 1, "a/block": BS, "a/b/c/over": BS + 1,
             "a/odd": 16 * BS + 123, "big": 1 << 20, "a/b/c/d/e/deep": 5 * BS}
    for i, (name, size) in enumerate(sizes.items()):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        write_file(src / name, rnd(size, i))
    (src / "a" / "link").symlink_to("block")
    os.chmod(src / "a" / "odd", 0o600)
    before = counters(fs.mnt)
    cp("-a", "--reflink=auto", src, workdir / "copy")
    moved = delta(before, counters(fs.mnt))

    nonempty = [n for n, s in sizes.items() if s]
    assert moved["clones"] >= len(nonempty), moved
    assert moved["cloned_bytes"] == sum(sizes.values()), moved
    assert (moved["bytes_read"], moved["bytes_written"], moved["bytes_served"]) == (0, 0, 0), moved
    for name in sizes:
        assert_shared(src / name, workdir / "copy" / name)
        assert read_file(workdir / "copy" / name) == read_file(src / name), name
    assert moved["saved_bytes"] == sum(-(-s // BS) * BS for s in sizes.values())
    assert os.readlink(workdir / "copy" / "a" / "link") == "block"
    assert stat.S_IMODE(os.stat(workdir / "copy" / "a" / "odd").st_mode) == 0o600


def test_cp_of_a_file_with_holes_copies_its_data_regions(fs, workdir):
    """cp 9.1 walks a file that looks sparse (fewer blocks than its size) with SEEK_DATA/SEEK_HOLE,
    which the mount answers from the extent map (test_seek.py). --sparse=auto, the default, reads and
    writes each data region and skips the holes, without copy_file_range whatever --reflink says (that
    is cp, not the mount): nothing is shared. --sparse=never copies each data region with
    copy_file_range (shared) and writes zeros for the holes, as never says. `reflinkfs clone` shares
    the whole file and keeps its holes."""
    src = workdir / "holey"
    with open(src, "wb") as f:
        f.write(rnd(BS, 1))
        f.seek(64 * BS)
        f.write(rnd(BS + 5, 2))
    data = read_file(src)
    src_map = block_map(src)
    assert sorted(src_map) == [0, 64, 65]
    before = counters(fs.mnt)
    cp(src, workdir / "auto")
    moved = delta(before, counters(fs.mnt))
    assert (moved["cfr_requests"], moved["bytes_written"]) == (0, 3 * BS), moved
    assert sorted(block_map(workdir / "auto")) == [0, 64, 65]
    assert read_file(workdir / "auto") == data
    before = counters(fs.mnt)
    cp("--sparse=never", src, workdir / "never")
    moved = delta(before, counters(fs.mnt))
    assert (moved["bytes_read"], moved["bytes_written"], moved["clones"]) == (0, 63 * BS, 2), moved
    never = block_map(workdir / "never")
    assert sorted(never) == list(range(66))
    assert {lb: never[lb][0] for lb in src_map} == {lb: pb for lb, (pb, _) in src_map.items()}
    assert read_file(workdir / "never") == data
    before = counters(fs.mnt)
    cli_ok("clone", src, workdir / "clone")
    moved = delta(before, counters(fs.mnt))
    assert (moved["bytes_read"], moved["bytes_written"]) == (0, 0), moved
    assert block_map(workdir / "clone") == {lb: (pb, 3) for lb, (pb, _) in src_map.items()}
    assert read_file(workdir / "clone") == data


# -- what cannot work on any FUSE filesystem --------------------------------------------------------
def test_reflink_always_and_clone_ioctls_fail_with_eopnotsupp(fs, workdir):
    """FUSE has no remap_file_range: the kernel refuses FICLONE, FICLONERANGE and FIDEDUPERANGE
    itself with EOPNOTSUPP and never asks the daemon. So `cp --reflink=always` cannot work; use
    `reflinkfs clone` for always-or-fail semantics."""
    src, dst = workdir / "src", workdir / "dst"
    write_file(src, rnd(4 * BS, 7))
    before = counters(fs.mnt)
    r = subprocess.run(["cp", "--reflink=always", src, workdir / "always"], capture_output=True, text=True)
    assert r.returncode != 0 and "Operation not supported" in r.stderr, r
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as e:
            fcntl.ioctl(dfd, FICLONE, sfd)
        assert e.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as e:
            fcntl.ioctl(dfd, FICLONERANGE, struct.pack("qQQQ", sfd, 0, BS, 0))
        assert e.value.errno == errno.EOPNOTSUPP
        # struct file_dedupe_range with one struct file_dedupe_range_info
        arg = bytearray(struct.pack("QQHHI", 0, BS, 1, 0, 0) + struct.pack("qQQiI", dfd, 0, 0, 0, 0))
        with pytest.raises(OSError) as e:
            fcntl.ioctl(sfd, FIDEDUPERANGE, arg)
        assert e.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(sfd)
        os.close(dfd)
    moved = delta(before, counters(fs.mnt))
    assert moved["cfr_requests"] == 0 and moved["clones"] == 0, "the daemon was asked"
    assert os.stat(dst).st_size == 0
    assert not (workdir / "always").exists() or os.stat(workdir / "always").st_size == 0


# -- copy_file_range(2) edge cases, against a local filesystem ---------------------------------------
def _outcome(fn):
    try:
        return fn()
    except OSError as e:
        return errno.errorcode[e.errno]


class Scene:
    """Two files in one directory with known contents, opened read-write; calls are logged."""

    def __init__(self, root, src_size=5 * BS + 300, dst_size=3 * BS + 77):
        self.root = root
        self.src_path, self.dst_path = os.path.join(root, "src"), os.path.join(root, "dst")
        write_file(self.src_path, rnd(src_size, 11))
        write_file(self.dst_path, rnd(dst_size, 12))
        self.src = os.open(self.src_path, os.O_RDWR)
        self.dst = os.open(self.dst_path, os.O_RDWR)
        self.fds = [self.src, self.dst]

    def open(self, name, flags, mode=0o644):
        fd = os.open(os.path.join(self.root, name), flags, mode)
        self.fds.append(fd)
        return fd

    def cfr(self, fd_in, fd_out, n, off_in=None, off_out=None):
        return _outcome(lambda: os.copy_file_range(fd_in, fd_out, n, off_in, off_out))

    def result(self):
        for fd in self.fds:
            os.close(fd)
        return {name: read_file(os.path.join(self.root, name)) for name in sorted(os.listdir(self.root))}


def _unaligned_offsets(s):          # block boundaries never line up: all copied
    return [s.cfr(s.src, s.dst, 2 * BS + 100, 300, BS + 1000)]


def _aligned_middle(s):             # same offset within a block: head and tail copied, middle shared
    return [s.cfr(s.src, s.dst, 3 * BS + 500, 300, BS + 300)]


def _same_file_apart(s):
    return [s.cfr(s.src, s.src, 2 * BS, 0, 3 * BS), s.cfr(s.src, s.src, 1000, 10, 2 * BS + 7)]


def _same_file_overlap(s):
    return [s.cfr(s.src, s.src, 2 * BS, 0, BS), s.cfr(s.src, s.src, 100, 50, 0), s.cfr(s.dst, s.dst, BS, 0, 0)]


def _source_at_or_past_eof(s):
    size = os.fstat(s.src).st_size
    return [s.cfr(s.src, s.dst, 100, size, 0), s.cfr(s.src, s.dst, 100, size + 5 * BS, 0)]


def _length_zero(s):
    return [s.cfr(s.src, s.dst, 0, 0, 0), s.cfr(s.src, s.dst, 0, 5, BS)]


def _past_source_eof_clipped(s):
    size = os.fstat(s.src).st_size
    return [s.cfr(s.src, s.dst, 1 << 30, size - BS - 10, 10), s.cfr(s.src, s.dst, 1 << 30, 0, 0)]


def _destination_past_eof(s):        # the gap reads as zeros
    return [s.cfr(s.src, s.dst, 2 * BS, 0, 10 * BS), s.cfr(s.src, s.dst, 3000, 100, 20 * BS + 5)]


def _source_end_into_longer_destination(s):   # the partial last block cannot be shared here
    size = os.fstat(s.src).st_size
    longer, same = s.open("longer", os.O_RDWR | os.O_CREAT), s.open("same", os.O_RDWR | os.O_CREAT)
    os.pwrite(longer, rnd(size + 2 * BS, 13), 0)
    os.pwrite(same, rnd(size, 14), 0)
    return [s.cfr(s.src, longer, 1 << 30, 0, 0), s.cfr(s.src, longer, 1 << 30, BS, 2 * BS),
            s.cfr(s.src, same, 1 << 30, 0, 0), s.cfr(s.src, s.dst, 1 << 30, 2 * BS, 0)]


def _file_positions(s):              # no offsets: both files' positions are used and advanced
    os.lseek(s.src, 1000, os.SEEK_SET)
    os.lseek(s.dst, 2 * BS, os.SEEK_SET)
    r = s.cfr(s.src, s.dst, BS)
    return [r, os.lseek(s.src, 0, os.SEEK_CUR), os.lseek(s.dst, 0, os.SEEK_CUR)]


def _directories(s):
    d = s.open(".", os.O_RDONLY | os.O_DIRECTORY)
    return [s.cfr(s.src, d, 10, 0, 0), s.cfr(d, s.dst, 10, 0, 0), _outcome(lambda: s.open(".", os.O_WRONLY))]


def _wrong_modes(s):
    app = s.open("dst", os.O_WRONLY | os.O_APPEND)
    ro = s.open("dst", os.O_RDONLY)
    wo = s.open("src", os.O_WRONLY)
    return [s.cfr(s.src, app, 10, 0, 0), s.cfr(s.src, app, 10), s.cfr(s.src, ro, 10, 0, 0),
            s.cfr(wo, s.dst, 10, 0, 0)]


def _too_big(s):                    # past the largest file either filesystem can hold
    return [s.cfr(s.src, s.dst, 10, 0, 1 << 47)]


def _bad_arguments(s):
    return [s.cfr(s.src, s.dst, 10, -1, 0), _outcome(lambda: copy_file_range_flags(s.src, s.dst, 10, 1))]


EDGE_CASES = {
    _unaligned_offsets: [2 * BS + 100],
    _aligned_middle: [3 * BS + 500],
    _same_file_apart: [2 * BS, 1000],
    _same_file_overlap: ["EINVAL"] * 3,
    _source_at_or_past_eof: [0, 0],
    _length_zero: [0, 0],
    _past_source_eof_clipped: [BS + 10, 5 * BS + 300],
    _destination_past_eof: [2 * BS, 3000],
    _source_end_into_longer_destination: [5 * BS + 300, 4 * BS + 300, 5 * BS + 300, 3 * BS + 300],
    _file_positions: [BS, 1000 + BS, 3 * BS],
    _directories: ["EISDIR", "EISDIR", "EISDIR"],
    _wrong_modes: ["EBADF"] * 4,
    _too_big: ["EFBIG"],
    _bad_arguments: ["EOVERFLOW", "EINVAL"],
}


@pytest.mark.parametrize("case", list(EDGE_CASES), ids=lambda f: f.__name__.strip("_"))
def test_copy_file_range_like_a_local_filesystem(fs, workdir, tmp_path, case):
    local = tmp_path / "local"
    local.mkdir()
    s = Scene(local)
    want = case(s)
    want_files = s.result()
    s = Scene(workdir)
    got = case(s)
    got_files = s.result()
    assert want == EDGE_CASES[case], "the local filesystem disagrees with copy_file_range(2) as expected here"
    assert got == want
    assert got_files.keys() == want_files.keys()
    for name in want_files:
        assert got_files[name] == want_files[name], f"{name} differs from the local filesystem's"


def test_aligned_middle_is_shared_and_only_head_and_tail_move(fs, workdir):
    src, dst = workdir / "src", workdir / "dst"
    write_file(src, rnd(8 * BS, 1))
    write_file(dst, rnd(8 * BS, 2))
    want = bytearray(read_file(dst))
    want[BS + 300:5 * BS + 100] = read_file(src)[300:4 * BS + 100]
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY)
    before = counters(fs.mnt)
    try:
        assert os.copy_file_range(sfd, dfd, 4 * BS - 200, 300, BS + 300) == 4 * BS - 200
    finally:
        os.close(sfd)
        os.close(dfd)
    moved = delta(before, counters(fs.mnt))
    # head block (source 0, destination 1) and tail block (4 / 5) are merged and written; blocks 1..3
    # of the source are shared as destination blocks 2..4
    assert moved["bytes_written"] == 2 * BS, moved
    s, d = block_map(src), block_map(dst)
    assert [d[i] for i in (2, 3, 4)] == [s[i] for i in (1, 2, 3)]
    assert all(s[i][1] == 2 for i in (1, 2, 3)) and s[0][1] == 1 and s[4][1] == 1
    assert d[1][0] not in {p for p, _ in s.values()} and d[5][0] not in {p for p, _ in s.values()}
    assert read_file(dst) == want


def test_copy_file_range_across_filesystems_is_exdev(fs, workdir, tmp_path):
    """Different filesystem types: the kernel refuses (EXDEV), callers such as cp fall back."""
    inside, outside = workdir / "f", tmp_path / "f"
    write_file(inside, b"x" * 100)
    write_file(outside, b"y" * 100)
    a, b = os.open(inside, os.O_RDWR), os.open(outside, os.O_RDWR)
    try:
        assert _outcome(lambda: os.copy_file_range(a, b, 100, 0, 0)) == "EXDEV"
        assert _outcome(lambda: os.copy_file_range(b, a, 100, 0, 0)) == "EXDEV"
    finally:
        os.close(a)
        os.close(b)


# -- a clone is a copy: writes to one never show in the other ------------------------------------------
class Model:
    """Files in one directory of the mount and their expected bytes; every change goes to both."""

    def __init__(self, root):
        self.root = root
        self.files: dict[str, bytearray] = {}

    def p(self, name):
        return os.path.join(self.root, name)

    def create(self, name, data: bytes):
        write_file(self.p(name), data)
        self.files[name] = bytearray(data)

    def cp(self, src, dst, *args):
        cp(*args, self.p(src), self.p(dst))
        self.files[dst] = bytearray(self.files[src])

    def clone(self, src, dst):
        cli_ok("clone", self.p(src), self.p(dst))
        self.files[dst] = bytearray(self.files[src])

    def pwrite(self, name, off, data: bytes):
        fd = os.open(self.p(name), os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, off) == len(data)
        finally:
            os.close(fd)
        f = self.files[name]
        if off > len(f):
            f.extend(bytes(off - len(f)))
        f[off:off + len(data)] = data

    def append(self, name, data: bytes):
        with open(self.p(name), "ab") as fh:
            fh.write(data)
        self.files[name] += data

    def truncate(self, name, size):
        os.truncate(self.p(name), size)
        f = self.files[name]
        if size < len(f):
            del f[size:]
        else:
            f.extend(bytes(size - len(f)))

    def punch(self, name, off, n):
        fd = os.open(self.p(name), os.O_WRONLY)
        try:
            punch_hole(fd, off, n)
        finally:
            os.close(fd)
        f = self.files[name]
        end = min(off + n, len(f))
        if off < end:
            f[off:end] = bytes(end - off)

    def overwrite(self, name, data: bytes):
        write_file(self.p(name), data)
        self.files[name] = bytearray(data)

    def cfr(self, src, dst, n, off_in, off_out):
        """copy_file_range between two files (or within one); returns the result or the errno name."""
        fds = {name: os.open(self.p(name), os.O_RDWR) for name in {src, dst}}
        try:
            r = _outcome(lambda: os.copy_file_range(fds[src], fds[dst], n, off_in, off_out))
        finally:
            for fd in fds.values():
                os.close(fd)
        s = self.files[src]
        count = max(0, min(n, len(s) - off_in))
        if src == dst and count and off_out < off_in + count and off_in < off_out + count:
            want = "EINVAL"
        else:
            want = count
            if count:
                piece = bytes(s[off_in:off_in + count])
                d = self.files[dst]
                if off_out > len(d):
                    d.extend(bytes(off_out - len(d)))
                d[off_out:off_out + count] = piece
        assert r == want, f"copy_file_range({src}, {dst}, {n}, {off_in}, {off_out}) = {r}, expected {want}"
        return r

    def unlink(self, name):
        os.unlink(self.p(name))
        del self.files[name]

    def verify(self, step: str):
        assert sorted(os.listdir(self.root)) == sorted(self.files), step
        for name, want in self.files.items():
            got = read_file(self.p(name))
            assert os.stat(self.p(name)).st_size == len(want), f"{step}: size of {name}"
            if got != want:
                first = next(i for i in range(min(len(got), len(want)) + 1)
                             if i == min(len(got), len(want)) or got[i] != want[i])
                raise AssertionError(f"after {step}: {name} differs from the model at byte {first} "
                                     f"(block {first // BS}); sizes {len(got)} / {len(want)}")


def test_writes_after_a_clone_never_reach_the_other_copy(mounts):
    store = mounts.store()
    m = mounts.mount(store)
    root = str(m.path("t"))
    os.mkdir(root)
    f = Model(root)

    def step(what, fn, *args):
        fn(*args)
        f.verify(what)

    step("create a", f.create, "a", rnd(10 * BS + 1000, 1))
    step("cp a b", f.cp, "a", "b")
    assert_shared(f.p("a"), f.p("b"))
    step("write last byte of block 0 of b", f.pwrite, "b", BS - 1, b"\x01")
    a_map, b_map = block_map(f.p("a")), block_map(f.p("b"))
    assert b_map[0][0] != a_map[0][0] and a_map[0][1] == 1 and b_map[0][1] == 1, "copy-on-write of one block"
    assert all(b_map[i] == a_map[i] and a_map[i][1] == 2 for i in range(1, 11)), "the rest stays shared"
    step("write first byte of block 2 of a", f.pwrite, "a", 2 * BS, b"\x02")
    step("write across blocks 3/4 of b", f.pwrite, "b", 4 * BS - 3, b"\x03" * 6)
    step("partial block inside a", f.pwrite, "a", 5 * BS + 100, rnd(200, 2))
    step("write into the shared partial last block of a", f.pwrite, "a", 10 * BS + 10, b"tail")
    step("append to b", f.append, "b", rnd(5000, 3))
    step("append to a", f.append, "a", b"A" * 3)
    step("truncate a shorter, inside a block", f.truncate, "a", 3 * BS + 17)
    step("truncate a longer", f.truncate, "a", 12 * BS + 5)
    step("write past a's old end", f.pwrite, "a", 12 * BS + 100, b"far")
    step("punch a hole in b", f.punch, "b", 2 * BS + 100, 3 * BS)
    step("punch whole blocks of b", f.punch, "b", 6 * BS, 2 * BS)
    # b has holes now: cp would copy its data regions with read/write (and with --sparse=never fill
    # its holes with zeros); reflinkfs clone shares it, holes kept
    b_map = block_map(f.p("b"))
    step("clone b c", f.clone, "b", "c")
    step("clone c d (clone of a clone)", f.clone, "c", "d")
    assert block_map(f.p("d")) == {lb: (pb, rc + 2) for lb, (pb, rc) in b_map.items()}
    step("write into c", f.pwrite, "c", BS + 5, rnd(3 * BS, 4))
    step("truncate d to 0 and regrow", f.truncate, "d", 0)
    step("regrow d", f.pwrite, "d", 2 * BS, rnd(BS + 1, 5))

    # remount midway: the clones and the copies-on-write survive, and fsck agrees with them
    m.unmount()
    m.check_after_unmount()
    m.start()
    f.verify("remount")

    step("cp a e", f.cp, "a", "e")
    step("clone e onto itself, aligned", f.cfr, "e", "e", 2 * BS, 0, 8 * BS)
    step("clone e onto itself, unaligned", f.cfr, "e", "e", BS + 10, 100, 7 * BS + 300)
    step("clone e onto itself, past its end", f.cfr, "e", "e", 3 * BS, 0, 20 * BS + 1)
    step("overlapping self clone is refused", f.cfr, "e", "e", 2 * BS, 0, BS)
    step("clone part of b into a", f.cfr, "b", "a", 5 * BS, BS, 0)
    step("overwrite all of a", f.overwrite, "a", rnd(7 * BS, 6))
    step("delete the original b", f.unlink, "b")
    step("write into c after b is gone", f.pwrite, "c", 0, b"c" * 10)
    step("delete a", f.unlink, "a")
    step("cp e a", f.cp, "e", "a")
    step("overwrite a in place", f.pwrite, "a", 0, rnd(len(f.files["a"]), 7))


@pytest.mark.parametrize("cache", ["shared", "inode", "none"])
def test_random_writes_and_clones_match_a_model(mounts, cache):
    """A few hundred random operations over four files, each followed by a full check; with each
    cache, since a clone changes what a logical block maps to under a cache's feet."""
    m = mounts.mount(options=["--cache", cache, "--cache-size", "1M"])
    r = random.Random(20260501)
    f = Model(str(m.mnt))
    names = ["f0", "f1", "f2", "f3"]
    for i, n in enumerate(names):
        f.create(n, rnd(r.randrange(0, 12 * BS), i))

    def off(limit):
        x = r.choice([0, BS, 2 * BS, r.randrange(0, 16 * BS)])
        return min(x + r.choice([0, 0, 1, -1, 100]), limit) if x else 0

    for i in range(150):
        op = r.choice(["write", "write", "cfr", "cfr", "cfr", "cp", "truncate", "punch", "append"])
        a, b = r.choice(names), r.choice(names)
        size = len(f.files[a])
        if op == "write":
            f.pwrite(a, off(16 * BS), rnd(r.choice([1, 10, BS, 3 * BS + 7]), i))
        elif op == "cfr":
            f.cfr(a, b, r.choice([BS, 4 * BS, 5000, 1 << 20]), off(max(size, 1)), off(16 * BS))
        elif op == "cp" and a != b:
            f.cp(a, b)
        elif op == "truncate":
            f.truncate(a, off(16 * BS))
        elif op == "punch":
            f.punch(a, off(16 * BS), r.choice([1, BS, 3 * BS + 5]))
        elif op == "append":
            f.append(a, rnd(r.choice([1, 100, BS]), i))
        f.verify(f"op {i}: {op} {a} {b}")


# -- inspection ---------------------------------------------------------------------------------------
def test_extents_xattr_is_readable_and_read_only(fs, workdir):
    path = workdir / "f"
    write_file(path, rnd(3 * BS + 1, 1))
    cp(path, workdir / "g")
    info = json.loads(os.getxattr(path, XATTR_EXTENTS))
    assert info["size"] == 3 * BS + 1 and info["block_size"] == BS and info["next"] is None
    assert [e[3] for e in info["extents"]] == [2] * len(info["extents"])
    assert sum(e[2] for e in info["extents"]) == 4
    assert info["shared_bytes"] == 4 * BS and info["exclusive_bytes"] == 0
    for name in (XATTR_EXTENTS, "user.reflinkfs.other"):
        for value in (b"[]", os.getxattr(path, XATTR_EXTENTS)):
            with pytest.raises(OSError) as e:
                os.setxattr(path, name, value)
            assert e.value.errno == errno.EPERM, name
        with pytest.raises(OSError) as e:
            os.removexattr(path, name)
        assert e.value.errno == errno.EPERM, name
    for name in (XATTR_STATUS, XATTR_EXTENTS):
        with pytest.raises(OSError) as e:
            os.setxattr(fs.mnt, name, b"{}")
        assert e.value.errno == errno.EPERM, name
    assert not [n for n in os.listxattr(path) if n.startswith("user.reflinkfs.")]
    assert json.loads(os.getxattr(path, XATTR_EXTENTS)) == info, "the map did not change"
    os.setxattr(path, "user.ordinary", b"v")          # the refusal is specific to our names
    assert os.getxattr(path, "user.ordinary") == b"v"


def test_extents_xattr_pages_join_in_reflinkfs_stat(fs, workdir):
    path = workdir / "sparse"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(1600):                 # one extent per written block, holes between
            os.pwrite(fd, b"x", 2 * i * BS)
    finally:
        os.close(fd)
    first = json.loads(os.getxattr(path, XATTR_EXTENTS))
    assert first["count"] == 1600 and first["next"] and len(first["extents"]) < 1600
    info = json.loads(cli_ok("stat", "--json", path))[str(path)]
    assert [e[0] for e in info["extents"]] == [2 * i for i in range(1600)]
    assert extents(path)["extents"] == info["extents"]


def test_df_shows_saved_bytes(fs, workdir):
    write_file(workdir / "f", rnd(64 * BS + 10, 3))
    before = json.loads(cli_ok("df", "--json", fs.mnt))
    cp(workdir / "f", workdir / "g")
    cp(workdir / "g", workdir / "h")
    after = json.loads(cli_ok("df", "--json", fs.mnt))
    assert after["saved_bytes"] - before["saved_bytes"] == 2 * 65 * BS
    assert after["physical_bytes"] == before["physical_bytes"]
    assert after["logical_bytes"] - before["logical_bytes"] == 2 * 65 * BS
    text = cli_ok("df", fs.mnt)
    assert f"saved bytes:     {after['saved_bytes']}" in text
    os.unlink(workdir / "f")
    os.unlink(workdir / "g")
    os.unlink(workdir / "h")
    assert json.loads(cli_ok("df", "--json", fs.mnt))["saved_bytes"] == before["saved_bytes"]


# -- the read path ---------------------------------------------------------------------------------
def test_reads_across_shared_units_holes_and_eof_are_exact(fs, workdir):
    """Reads are answered by the mount's iovec read handler (a list of cache buffers per reply): any
    offset and size, across 64 KiB cache units, extents of two files, a hole and EOF, gives exact bytes."""
    UNIT = 16 * BS
    src, dst = workdir / "rsrc", workdir / "rdst"
    data = bytearray(rnd(5 * UNIT + 3000, 91))
    write_file(src, bytes(data))
    cp("--reflink=auto", src, dst)
    with open(dst, "r+b") as f:                  # a private block in the middle of the shared extent
        f.seek(2 * UNIT + 5 * BS)
        f.write(b"\xee" * BS)
        f.truncate(len(data) + 2 * UNIT)          # a hole after the last data
    data[2 * UNIT + 5 * BS:2 * UNIT + 6 * BS] = b"\xee" * BS
    data += bytes(2 * UNIT)
    before = status(fs.mnt)["extops"]["ops"]["read"]["requests"]
    fd = os.open(dst, os.O_RDONLY)
    try:
        r = random.Random(5)
        cases = [(0, len(data)), (1, 1 << 20), (UNIT - 1, 2), (2 * UNIT + 5 * BS - 7, BS + 14),
                 (len(data) - 10, 4096), (len(data), 4096)]
        cases += [(r.randrange(len(data) + 100), r.randrange(1, 300_000)) for _ in range(200)]
        for off, size in cases:
            assert os.pread(fd, size, off) == bytes(data[off:off + size]), (off, size)
    finally:
        os.close(fd)
    assert status(fs.mnt)["extops"]["ops"]["read"]["requests"] - before >= len(cases) - 1


def test_concurrent_first_copies_all_reach_the_daemon(mounts):
    """The first copy_file_range calls of a mount, made at the same moment from several threads, must all
    be served by the daemon. Linux 6.18 first asks with FUSE_COPY_FILE_RANGE_64 and, on ENOSYS, retries with
    the older request; when two first calls race, the one answered second can take its ENOSYS for the older
    request's and switch copy_file_range off for the whole mount. The kernel then copies through the page
    cache in 64 KiB pieces, which neither shares extents nor copies atomically. So the daemon must answer
    the newer request too. Several fresh mounts, since the race is a matter of timing."""
    threads, rounds = 6, 6
    data = [rnd(4 * BS + 100, i) for i in range(threads)]
    for r in range(rounds):
        m = mounts.mount(mounts.store())
        for i in range(threads):
            m.path(f"src{i}").write_bytes(data[i])
            m.path(f"dst{i}").write_bytes(b"")
        before = counters(m.mnt)
        barrier = threading.Barrier(threads)
        copied = [0] * threads

        def copy(i):
            with open(m.path(f"src{i}"), "rb") as s, open(m.path(f"dst{i}"), "r+b") as d:
                barrier.wait()
                copied[i] = os.copy_file_range(s.fileno(), d.fileno(), len(data[i]), 0, 0)

        workers = [threading.Thread(target=copy, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        got = delta(before, counters(m.mnt))
        assert copied == [len(d) for d in data], f"round {r}: {copied}"
        assert got["clones"] == threads, f"round {r}: only {got['clones']} of {threads} copies reached the daemon"
        for i in range(threads):
            assert m.path(f"dst{i}").read_bytes() == data[i]
            assert_shared(m.path(f"src{i}"), m.path(f"dst{i}"))
        m.unmount()
        m.check_after_unmount()


def test_a_copy_over_4_gib_reports_what_it_copied(fs, workdir):
    """One copy_file_range call longer than 4 GiB: the count the caller gets must be what the daemon copied.
    (The older FUSE request carries a 32-bit count; the daemon copies at most 4 GiB - 4 KiB per call, and the
    caller asks again for the rest, as it must for any short copy.)"""
    src, dst = workdir / "big", workdir / "big.copy"
    size = 5 << 30
    with open(src, "wb") as f:
        f.truncate(size)
        f.seek(size - 3 * BS)
        f.write(rnd(2 * BS + 7, 9))
    dst.write_bytes(b"")
    with open(src, "rb") as s, open(dst, "r+b") as d:
        first = os.copy_file_range(s.fileno(), d.fileno(), size, 0, 0)
        assert 0 < first < 1 << 32
        assert os.fstat(d.fileno()).st_size == first, "the count returned is not what was copied"
        total = first
        while total < size:
            n = os.copy_file_range(s.fileno(), d.fileno(), size - total, total, total)
            assert n > 0
            total += n
    assert os.path.getsize(dst) == size
    with open(dst, "rb") as d:
        d.seek(size - 3 * BS)
        assert d.read() == rnd(2 * BS + 7, 9) + bytes(BS - 7)
