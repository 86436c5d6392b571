"""Memory on a real mount: four reflinked copies of a file cost one copy in shared mode, four in inode mode,
and the kernel page cache holds no copy of its own (direct_io mount files, O_DIRECT data file).

Measured, never timed: the daemon's own cache statistics (`reflinkfs status --json`) and the kernel's page
cache of each file. The page cache of a mount file is asked of the kernel on the descriptor that read it
(cachestat/mincore, scripts/_memlib.py), not with fincore(1): fincore opens the file again, and opening a
FUSE file without keep_cache drops that inode's page cache, so it would read 0 whatever was cached and the
check could not fail. `test_kernel_cache_mount_is_seen_caching_a_copy_per_file` shows that the same
measurement does see per-inode copies when the mount lets the kernel cache.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mountutil import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import _memlib  # noqa: E402

MiB = 1 << 20
SIZE = 32 * MiB
UNIT = 64 << 10            # the cache unit (reflinkfs.core.cache.UNIT)
FILES = 4                  # the base file and three reflinked copies
SLACK = 1 * MiB            # page cache a direct_io mount may still show (none is expected)


def _data() -> bytes:
    return random.Random(7).randbytes(SIZE)


def _populate(m) -> list[Path]:
    """Write the base file, make three copies with `cp --reflink=auto`, check they share extents."""
    data = _data()
    base = m.path("base")
    with open(base, "wb", buffering=0) as f:
        for off in range(0, SIZE, MiB):
            f.write(data[off:off + MiB])
    copies = [base]
    for i in range(1, FILES):
        dst = m.path(f"copy{i}")
        subprocess.run(["cp", "--reflink=auto", str(base), str(dst)], check=True, timeout=120)
        copies.append(dst)
    st = _status(m)
    assert st["clones"] == FILES - 1 and st["usage"]["physical_bytes"] == SIZE, \
        f"the copies do not share extents, the test would measure nothing: {st}"
    return copies


def _status(m) -> dict:
    r = run_cli("status", "--json", m.mnt)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _read_all(paths) -> list[int]:
    """Open every file first (an open may drop a FUSE inode's pages), then read each fully and check it.
    Returns the descriptors, still open, for measuring."""
    data = _data()
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths]
    try:
        buf = bytearray(MiB)
        for fd in fds:
            off = 0
            while True:
                n = os.readv(fd, [buf])
                if n == 0:
                    break
                assert buf[:n] == data[off:off + n]
                off += n
            assert off == SIZE
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _data_file_page_cache(store) -> int:
    got = _memlib.fincore_bytes(store / "data")
    return _memlib.file_page_cache(store / "data") if got is None else got


@pytest.mark.parametrize("mode", ["shared", "inode"])
def test_four_reflinked_copies_on_a_mount(mounts, mode):
    m = mounts.mount(mounts.store(), options=["--cache", mode, "--cache-size", "256M", "--passthrough", "off"],
                     foreground=False)
    paths = _populate(m)
    read_before = _status(m)["data_file"]["bytes_read"]     # writes may read blocks they merge into
    fds = _read_all(paths)
    try:
        kernel_files = sum(_memlib.page_cache_bytes(fd) for fd in fds)
        kernel_data = _data_file_page_cache(m.store)
        st = _status(m)
    finally:
        for fd in fds:
            os.close(fd)
    cache = st["cache"]
    resident = cache["resident_bytes"]
    assert cache["mode"] == mode and cache["evictions"] == 0
    assert cache["bytes_served"] >= FILES * SIZE
    if mode == "shared":
        assert resident <= 1.05 * SIZE + UNIT, f"shared: {resident} bytes resident for {FILES} copies"
        assert st["data_file"]["bytes_read"] - read_before <= 1.05 * SIZE + UNIT   # the data file read once
    else:
        assert 3.5 * SIZE <= resident <= 4.2 * SIZE, f"inode: {resident / SIZE:.2f} copies resident"
        assert st["data_file"]["bytes_read"] - read_before >= 3.5 * SIZE
    # the kernel kept no copy of its own: not per mount file (direct_io), not of the data file (O_DIRECT)
    assert kernel_files <= SLACK, f"{kernel_files} bytes of mount files in the page cache"
    assert st["data_file"]["direct_io"]
    assert kernel_data <= SLACK, f"{kernel_data} bytes of the store's data file in the page cache"


def test_kernel_cache_mount_is_seen_caching_a_copy_per_file(mounts):
    """The control: with --kernel-cache the kernel caches every inode's pages, and the measurement used
    above sees about one copy per file (so the direct_io assertions can fail)."""
    m = mounts.mount(mounts.store(), options=["--cache-size", "256M", "--kernel-cache"], foreground=False)
    fds = _read_all(_populate(m))
    try:
        kernel_files = sum(_memlib.page_cache_bytes(fd) for fd in fds)
        st = _status(m)
    finally:
        for fd in fds:
            os.close(fd)
    assert kernel_files >= 3.5 * SIZE, f"only {kernel_files} bytes of {FILES} files seen in the page cache"
    assert st["cache"]["resident_bytes"] <= 1.05 * SIZE + UNIT     # the daemon still holds one copy
