"""`df -i` on a mount: inodes in use are the inodes in the store, and change by exactly the number of
files made or removed; free inodes are what the available space could hold at one 4 KiB block each
(f_ffree = f_favail = f_bavail, since f_frsize is 4096); total = used + free."""
from __future__ import annotations

import os
import subprocess

from mountutil import wait_for

BS = 4096


def inodes(mnt) -> tuple[int, int, int]:
    """(used, free, total) as statvfs reports them, checked against the stated rule."""
    s = os.statvfs(mnt)
    assert s.f_frsize == BS
    assert s.f_ffree == s.f_favail == s.f_bavail, s
    assert s.f_files >= s.f_ffree
    return s.f_files - s.f_ffree, s.f_ffree, s.f_files


def make_tree(root, n: int) -> None:
    """n inodes: files, directories, a symlink, a fifo."""
    os.mkdir(root / "d")
    os.symlink("d", root / "link")
    os.mkfifo(root / "fifo")
    for i in range(n - 3):
        (root / "d" / f"f{i}").write_bytes(b"")


def remove_tree(root) -> None:
    for name in os.listdir(root / "d"):
        os.unlink(root / "d" / name)
    os.rmdir(root / "d")
    os.unlink(root / "link")
    os.unlink(root / "fifo")


def test_df_i_on_a_size_limited_store(mounts):
    m = mounts.mount(mounts.store("--size", "64M"))
    used0, free0, total0 = inodes(m.mnt)
    assert used0 == 1                                   # the root
    assert free0 == (64 << 20) // BS                    # an empty store: its whole size, a block an inode
    assert total0 == used0 + free0

    make_tree(m.mnt, 40)
    used1, free1, total1 = inodes(m.mnt)
    assert used1 - used0 == 40
    assert free1 == free0, "empty files take no data blocks"
    assert total1 == total0 + 40

    fd = os.open(m.path("data"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, os.urandom(10 * BS))
        os.fsync(fd)
    finally:
        os.close(fd)
    used2, free2, _ = inodes(m.mnt)
    assert used2 == used1 + 1 and free2 == free1 - 10, "ten data blocks leave room for ten fewer inodes"

    remove_tree(m.mnt)
    os.unlink(m.path("data"))
    used3, free3, total3 = inodes(m.mnt)
    assert (used3, free3, total3) == (used0, free0, total0)
    out = subprocess.run(["df", "--output=iused,iavail,itotal", str(m.mnt)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert [int(x) for x in out[-3:]] == [used3, free3, total3]
    m.unmount()


def test_df_i_on_an_unlimited_store(mounts):
    """Free inodes follow the disk under the store, which other things change; used ones are exact."""
    m = mounts.mount()
    used0, _, _ = inodes(m.mnt)
    assert used0 == 1
    make_tree(m.mnt, 250)
    used1, free1, total1 = inodes(m.mnt)
    assert used1 - used0 == 250
    assert free1 > 0 and total1 == used1 + free1
    remove_tree(m.mnt)
    assert inodes(m.mnt)[0] == used0
    m.unmount()


def test_a_file_unlinked_while_open_holds_its_inode(mounts):
    m = mounts.mount(mounts.store("--size", "64M"))
    used0, free0, _ = inodes(m.mnt)
    fd = os.open(m.path("f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * BS)
        os.unlink(m.path("f"))
        assert inodes(m.mnt)[:2] == (used0 + 1, free0 - 1), "the open file still takes an inode and a block"
    finally:
        os.close(fd)
    # the kernel sends RELEASE after close returns: wait for the inode to be freed
    wait_for(lambda: inodes(m.mnt)[:2] == (used0, free0), 30, "the unlinked file's inode to be freed")
    m.unmount()
