"""What a user sees of segments: `reflinkfs stat` (and --json) gives a file's segment and whether it is
whole; `reflinkfs df` counts whole files and bytes. A file written through the mount from empty, in
order or at random offsets, is whole; so are its `cp --reflink=auto` copies, which share its segment. A
sharer stops being whole when one of its blocks is rewritten, when a hole is punched in a shared range,
or when it is truncated; the other sharers stay whole."""
from __future__ import annotations

import json
import os
import random
import subprocess

from mountutil import run_cli

BS = 4096


def stat_json(path) -> dict:
    r = run_cli("stat", "--json", path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[str(path)]


def whole(path) -> bool:
    return stat_json(path)["whole"]


def cp(src, dst) -> None:
    subprocess.run(["cp", "--reflink=auto", src, dst], check=True)


def whole_files(mnt) -> int:
    return json.loads(run_cli("df", "--json", mnt).stdout)["whole_files"]


def test_files_written_from_empty_and_their_copies_are_whole(mounts):
    m = mounts.mount(mounts.store())
    rng = random.Random(3)
    seq = rng.randbytes(7 * BS + 33)
    with open(m.path("a"), "wb", buffering=0) as f:     # in order, in pieces that straddle blocks
        for off in range(0, len(seq), 1000):
            f.write(seq[off:off + 1000])
    order = list(range(12))
    rng.shuffle(order)
    blocks = {i: rng.randbytes(BS) for i in order}
    fd = os.open(m.path("r"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in order:
            os.pwrite(fd, blocks[i], i * BS)
    finally:
        os.close(fd)
    fd = os.open(m.path("s"), os.O_WRONLY | os.O_CREAT, 0o644)    # sparse: its holes are holes of the
    try:                                                           # segment too
        os.pwrite(fd, b"end", 20 * BS)
        os.pwrite(fd, b"start", 0)
    finally:
        os.close(fd)
    assert whole(m.path("s"))
    for name in ("a", "r"):
        info = stat_json(m.path(name))
        assert (info["whole"], info["not_whole_because"]) == (True, ""), name
        assert info["segment"] > 0
    assert "whole" in run_cli("stat", m.path("a")).stdout
    cp(m.path("a"), m.path("b"))
    cp(m.path("r"), m.path("r2"))
    assert stat_json(m.path("b"))["segment"] == stat_json(m.path("a"))["segment"]
    assert stat_json(m.path("r2"))["segment"] == stat_json(m.path("r"))["segment"]
    assert all(whole(m.path(n)) for n in ("a", "b", "r", "r2"))
    with open(m.path("b"), "rb") as f:
        assert f.read() == seq
    r = run_cli("df", "--json", m.mnt)
    assert json.loads(r.stdout)["whole_files"] == 5
    assert json.loads(r.stdout)["whole_bytes"] == 2 * len(seq) + 2 * 12 * BS + 20 * BS + 3
    assert "whole files:     5" in run_cli("df", m.mnt).stdout


def test_a_rewritten_block_a_shared_hole_or_a_truncation_ends_wholeness(mounts):
    m = mounts.mount(mounts.store())
    data = random.Random(4).randbytes(9 * BS + 100)
    with open(m.path("a"), "wb") as f:
        f.write(data)
    for name in ("b", "c", "d"):
        cp(m.path("a"), m.path(name))
    assert whole_files(m.mnt) == 4
    with open(m.path("b"), "r+b") as f:              # one block of a sharer rewritten
        os.pwrite(f.fileno(), b"x" * BS, 3 * BS)
    info = stat_json(m.path("b"))
    assert info["whole"] is False and "segments" in info["not_whole_because"]
    assert "not whole" in run_cli("stat", m.path("b")).stdout
    subprocess.run(["fallocate", "--punch-hole", "-o", str(2 * BS), "-l", str(BS), m.path("c")], check=True)
    info = stat_json(m.path("c"))                     # the segment still holds the others' block there
    assert info["whole"] is False and "another file uses block 2" in info["not_whole_because"]
    os.truncate(m.path("d"), 4 * BS)                  # truncation of one sharer
    info = stat_json(m.path("d"))
    assert info["whole"] is False and "bytes, the file" in info["not_whole_because"]
    assert whole(m.path("a")), "the other sharer keeps its layout"
    assert whole_files(m.mnt) == 1
    with open(m.path("a"), "rb") as f:
        assert f.read() == data


def test_a_file_rewritten_from_empty_is_whole_again(mounts):
    """Truncated to nothing and written again (what `cp` onto an existing file does) after a commit: the
    old blocks are still the committed state's, so the file rolls to a new segment of its own."""
    m = mounts.mount(mounts.store())
    with open(m.path("f"), "wb") as f:
        f.write(b"1" * (5 * BS))
        os.fsync(f.fileno())
    seg = stat_json(m.path("f"))["segment"]
    with open(m.path("f"), "wb") as f:
        f.write(b"2" * (6 * BS + 1))
    info = stat_json(m.path("f"))
    assert info["whole"] is True and info["segment"] != seg
    with open(m.path("f"), "rb") as f:
        assert f.read() == b"2" * (6 * BS + 1)
