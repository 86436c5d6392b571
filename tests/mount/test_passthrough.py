"""FUSE passthrough on a real mount: read-only opens of whole files are read (and mapped, and executed) by
the kernel from their segment's file, one registration shared by all clones, with no READ reaching the
daemon; every other open stays on the daemon path; a change of a file held open in passthrough waits for
its readers, then fails with ETXTBSY; after a file stops being whole nothing reads its old bytes.

Files written from empty are whole in a segment of their own (the allocator's identity layout); files
named z* are kept in segment 0 (Volume.small_file_bytes), which is never whole; `cp --reflink=auto`
copies share segments. Where the kernel or the daemon cannot do passthrough
these tests skip, unless REFLINKFS_REQUIRE_FUSE=1 (CI), which makes them fail.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest

from pathlib import Path

from mountutil import assert_fsck_clean, is_mounted, run_cli, wait_for
from reflinkfs.core.volume import Volume

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import _memlib  # noqa: E402

BS = 4096
DATA = random.Random(11).randbytes(64 * BS + 321)


def status(m) -> dict:
    r = run_cli("status", "--json", m.mnt)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def pt(m) -> dict:
    return status(m)["passthrough"]


def reads(m) -> int:
    return status(m)["extops"]["ops"].get("read", {}).get("requests", 0)


def need_passthrough(m) -> None:
    p = pt(m)
    if not p["active"]:
        reason = f"passthrough unavailable: {p['unavailable']}"
        if os.environ.get("REFLINKFS_REQUIRE_FUSE") == "1":
            pytest.fail(f"REFLINKFS_REQUIRE_FUSE=1 but {reason}")
        pytest.skip(reason)


def whole_store(mounts, **files) -> str:
    """A store with the given files (name -> (bytes, mode)), each written whole into a segment of its own;
    a file named z* stays in segment 0."""
    store = mounts.store()
    v = Volume.open(str(store))
    ino = {}
    for name, (data, mode) in files.items():
        v.small_file_bytes = 1 << 62 if name.startswith("z") else 0
        ino[name] = v.create(1, name.encode(), mode, 0, 0).ino
        v.write(ino[name], 0, data)
    for name, i in ino.items():
        assert v.wholeness(i).whole != name.startswith("z"), name
    v.close()
    return store


@pytest.fixture
def m(mounts):
    """a: whole (segment 1); z: the same bytes in segment 0."""
    mnt = mounts.mount(whole_store(mounts, a=(DATA, 0o644), z=(DATA, 0o644)))
    need_passthrough(mnt)
    return mnt


def settled(m, **want) -> None:
    """Wait until the passthrough counts are as wanted (RELEASE reaches the daemon after close returns)."""
    wait_for(lambda: all(pt(m)[k] == v for k, v in want.items()), 10, f"passthrough counts {want}")


def test_clones_are_read_and_mapped_by_the_kernel_through_one_backing_file(m):
    for name in ("b", "c"):
        subprocess.run(["cp", "--reflink=auto", m.path("a"), m.path(name)], check=True)
    settled(m, open_now=0, backing_files=0)
    before = reads(m)
    files = [open(m.path(n), "rb") for n in ("a", "b", "c")]
    try:
        assert all(f.read() == DATA for f in files)
        with mmap.mmap(files[1].fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert mm[:] == DATA
        p = pt(m)
        assert (p["open_now"], p["backing_files"]) == (3, 1)
        assert reads(m) == before                       # not one READ reached the daemon
    finally:
        for f in files:
            f.close()
    settled(m, open_now=0, backing_files=0)
    with open(m.path("z"), "rb") as f:                  # segment 0: not whole, the daemon path
        assert f.read() == DATA
    assert reads(m) > before and pt(m)["refusals"].get("not whole", 0) >= 1
    text = run_cli("status", m.mnt).stdout
    assert "passthrough: on;" in text and "not whole" in text
    assert "passthrough on" in m.log()


def test_a_write_open_of_a_held_file_fails_with_etxtbsy_and_goes_on_after_the_close(m):
    f = open(m.path("a"), "rb")
    for change in (lambda: open(m.path("a"), "r+b"), lambda: os.truncate(m.path("a"), 0)):
        with pytest.raises(OSError) as e:
            change()
        assert e.value.errno == errno.ETXTBSY
    f.close()
    # the reader's close and a writer's open at once, in one process and in two: the RELEASE may come
    # after the OPEN, which then waits for it; never ETXTBSY, never EIO
    reader = textwrap.dedent(f"""
        with open({str(m.path('a'))!r}, "rb") as f:
            assert f.read(10) == {DATA[:10]!r}
    """)
    for i in range(40):
        if i % 2:
            subprocess.run([sys.executable, "-c", reader], check=True)
        else:
            with open(m.path("a"), "rb") as f:
                assert f.read(10) == DATA[:10]
        with open(m.path("a"), "r+b"):
            pass
    p = pt(m)
    assert p["busy"] == 2 and p["opens"] >= 41
    with open(m.path("a"), "rb") as f:
        assert f.read() == DATA


def test_readers_and_a_writer_in_two_processes(m):
    """A reader opens, reads and closes in a loop while another process rewrites the file again and again:
    no EIO, the writer gets in (waiting for the reader's releases), and once it is done the reader sees
    its last version."""
    writer = textwrap.dedent(f"""
        import errno, time
        for v in range(1, 11):
            while True:
                try:
                    f = open({str(m.path('a'))!r}, "r+b")
                    break
                except OSError as e:
                    assert e.errno == errno.ETXTBSY, e
            with f:
                f.write(bytes([v]) * {len(DATA)})
    """)
    w = subprocess.Popen([sys.executable, "-c", writer])
    seen = 0
    while w.poll() is None:
        with open(m.path("a"), "rb") as f:
            assert len(f.read()) == len(DATA)
        seen += 1
    assert w.returncode == 0 and seen > 0
    with open(m.path("a"), "rb") as f:
        assert f.read() == bytes([10]) * len(DATA)
    assert pt(m)["refusals"].get("not whole", 0) >= 1


def test_a_mapping_of_a_clone_while_another_clone_is_rewritten(m):
    for name in ("b", "c"):
        subprocess.run(["cp", "--reflink=auto", m.path("a"), m.path(name)], check=True)
    new = random.Random(5).randbytes(len(DATA))
    with open(m.path("b"), "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert mm[:BS] == DATA[:BS]
        with open(m.path("c"), "r+b") as g:            # c is not held: its writer goes on
            g.write(new)
        assert mm[:] == DATA                            # b's bytes never changed
        with open(m.path("c"), "rb") as g:
            assert g.read() == new
        with open(m.path("b"), "rb") as g:             # b is still whole: passthrough again
            assert g.read() == DATA
            assert pt(m)["open_now"] == 2
    with open(m.path("a"), "rb") as f:
        assert f.read() == DATA


def test_exec_from_a_clone_while_the_source_is_deleted(mounts):
    with open("/bin/true", "rb") as f:
        prog = f.read()
    m = mounts.mount(whole_store(mounts, prog=(prog, 0o755)))
    need_passthrough(m)
    subprocess.run(["cp", "--reflink=auto", m.path("prog"), m.path("copy")], check=True)
    os.chmod(m.path("copy"), 0o755)
    os.unlink(m.path("prog"))
    opens = pt(m)["opens"]
    before = reads(m)
    assert subprocess.run([str(m.path("copy"))]).returncode == 0
    assert pt(m)["opens"] > opens and reads(m) == before
    with open(m.path("copy"), "rb") as f:
        assert f.read() == prog


def test_a_file_that_stops_being_whole_is_never_read_stale(m):
    subprocess.run(["cp", "--reflink=auto", m.path("a"), m.path("keep")], check=True)
    with open(m.path("a"), "rb") as f:                  # the segment's file is in the page cache now
        assert f.read() == DATA
    with open(m.path("a"), "r+b") as f:
        os.pwrite(f.fileno(), b"\xff" * BS, 2 * BS)
    expect = DATA[:2 * BS] + b"\xff" * BS + DATA[3 * BS:]
    refused = pt(m)["refusals"].get("not whole", 0)
    for _ in range(2):
        with open(m.path("a"), "rb") as f:
            assert f.read() == expect
        with open(m.path("a"), "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert mm[:] == expect
    assert pt(m)["refusals"]["not whole"] >= refused + 2
    os.truncate(m.path("keep"), 5 * BS)                  # truncated: shorter than its segment, not whole
    with open(m.path("keep"), "rb") as f:
        assert f.read() == DATA[:5 * BS]


def test_a_clone_of_a_whole_file_over_a_rewritten_one_passes_through_again(m):
    subprocess.run(["cp", "--reflink=auto", m.path("a"), m.path("b")], check=True)
    with open(m.path("b"), "r+b") as f:
        f.write(b"x" * BS)
    opens = pt(m)["opens"]
    with open(m.path("b"), "rb") as f:
        assert f.read(BS) == b"x" * BS
    assert pt(m)["opens"] == opens                       # rewritten: the daemon path
    settled(m, open_now=0)
    r = run_cli("clone", "--force", m.path("a"), m.path("b"))
    assert r.returncode == 0, r.stderr
    with open(m.path("b"), "rb") as f:
        assert f.read() == DATA
    assert pt(m)["opens"] > opens                        # whole again: passthrough again


def test_kill_9_with_passthrough_files_open_then_fsck_is_clean(mounts):
    store = whole_store(mounts, a=(DATA, 0o644), z=(DATA, 0o644))
    m = mounts.mount(store)
    need_passthrough(m)
    subprocess.run(["cp", "--reflink=auto", m.path("a"), m.path("b")], check=True)
    d = os.open(m.mnt, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(d)                                          # committed: the clone outlives the crash
    os.close(d)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import mmap, sys, time
        fs = [open(p, "rb") for p in ({str(m.path('a'))!r}, {str(m.path('b'))!r})]
        mm = mmap.mmap(fs[1].fileno(), 0, prot=mmap.PROT_READ)
        assert mm[:16] == {DATA[:16]!r}
        print("ready", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert pt(m)["open_now"] == 2
        os.kill(m.pid, signal.SIGKILL)
        assert m.wait_daemon_exit(30)
    finally:
        holder.kill()
        holder.wait()
    m.force_unmount()
    assert not is_mounted(m.mnt)
    with open("/proc/self/mountinfo") as f:
        assert "segs" not in f.read()                    # the read-only view was never in a mount table
    assert_fsck_clean(store)
    m2 = mounts.mount(store, m.mnt)
    with open(m2.path("b"), "rb") as f:
        assert f.read() == DATA
    assert pt(m2)["opens"] == 1


def test_passthrough_off_keeps_every_file_on_the_daemon_path(mounts):
    m = mounts.mount(whole_store(mounts, a=(DATA, 0o644)), options=["--passthrough", "off"])
    before = reads(m)
    with open(m.path("a"), "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert f.read() == DATA and mm[:] == DATA
    p = pt(m)
    assert (p["mode"], p["active"], p["opens"]) == ("off", False, 0) and "--passthrough off" in p["unavailable"]
    assert reads(m) > before
    assert "passthrough: off (turned off" in run_cli("status", m.mnt).stdout
    assert status(m)["negotiated"]["passthrough"] is False


def test_the_segments_page_cache_outlives_the_daemons_commits(m):
    """The kernel's copy of a whole file is its segment's page cache: the daemon's page-cache drops after a
    commit (of other files' writes) must leave it, or every reader goes back to the disk."""
    seg = Path(m.store) / "segs" / "1"
    with open(m.path("a"), "rb") as f:
        assert f.read() == DATA
    cached = _memlib.file_page_cache(seg)
    assert cached >= len(DATA) - BS
    for i in range(3):                                  # writes elsewhere, then a commit (fsync of the dir)
        with open(m.path(f"w{i}"), "wb") as f:
            f.write(os.urandom(4 * BS))
        d = os.open(m.mnt, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(d)
        os.close(d)
        with open(m.path("z"), "rb") as f:              # a read on the daemon path
            assert f.read(BS) == DATA[:BS]
    assert _memlib.file_page_cache(seg) >= cached
