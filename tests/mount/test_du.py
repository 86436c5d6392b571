"""`reflinkfs du` on a tree with clones, partial overwrites, holes, a file sharing blocks with itself, and
hard links: its figures agree with `reflinkfs stat` summed over the files (each inode once), and with
a block-by-block count made here from the files' extent maps."""
from __future__ import annotations

import json
import os

import pytest

from mountutil import run_cli

BS = 4096


def write(path, nbytes: int, seed: int) -> None:
    path.write_bytes(bytes([seed]) * 7 + os.urandom(nbytes - 7))


def overwrite(path, block: int, nblocks: int) -> None:
    with open(path, "r+b") as f:
        f.seek(block * BS)
        f.write(os.urandom(nblocks * BS))


def copy_range(src, src_off, dst, dst_off, n) -> None:
    # a file copied into itself is opened once, for writing: a read-only open of a whole file is passed
    # through to the kernel, and a write open of it while that one is held fails with ETXTBSY (README)
    with open(dst, "r+b") as d, (open(src, "rb") if src != dst else open(os.devnull)) as s:
        sfd = d.fileno() if src == dst else s.fileno()
        assert os.copy_file_range(sfd, d.fileno(), n, src_off, dst_off) == n


@pytest.fixture
def tree(workdir):
    """workdir/{a,b,c} with every kind of sharing, and a file outside them that shares with a."""
    a, b, c = workdir / "a", workdir / "b", workdir / "a" / "c"
    for d in (a, b, c):
        d.mkdir()
    write(a / "big", 300 * BS, 1)
    assert run_cli("clone", a / "big", b / "big-clone").returncode == 0
    overwrite(b / "big-clone", 10, 20)                   # partly rewritten: those blocks no longer shared
    r = run_cli("clone", a / "big", c / "big-clone2")
    assert r.returncode == 0, r.stderr
    overwrite(c / "big-clone2", 250, 100)                # rewritten past the end: grows
    write(a / "small", 3 * BS + 100, 2)
    os.link(a / "small", c / "small-link")                # a hard link inside a: counted once
    os.link(a / "small", b / "small-link")                # and one in b
    write(b / "self", 40 * BS, 3)
    copy_range(b / "self", 0, b / "self", 20 * BS, 10 * BS)   # a file sharing blocks with itself
    with open(b / "sparse", "wb") as f:                   # holes map nothing
        f.seek(100 * BS)
        f.write(os.urandom(BS))
    (b / "empty").touch()
    os.symlink("../a/big", b / "link-to-big")            # not followed
    write(workdir / "outside", 50 * BS, 4)
    copy_range(a / "big", 0, workdir / "outside", 0, 30 * BS)    # a shares with a file outside the paths
    return workdir


def files_under(path) -> dict[int, str]:
    """st_ino -> one path, for every regular file under path (each inode once)."""
    if path.is_file():
        return {os.stat(path).st_ino: str(path)}
    out = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if os.path.isfile(p) and not os.path.islink(p):
                out.setdefault(st.st_ino, p)
    return out


def stat_of(paths) -> dict:
    r = run_cli("stat", "--json", *paths)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def oracle(path_sets: list[dict[int, str]]) -> tuple[list[dict], dict]:
    """du's figures counted block by block from `reflinkfs stat` extent maps."""
    per_path, blocks_of = [], []
    for files in path_sets:
        info = stat_of(files.values())
        refs: dict[int, int] = {}
        rc_of: dict[int, int] = {}
        for f in info.values():
            for _, pb, n, rc in f["extents"]:
                for b in range(pb, pb + n):
                    refs[b] = refs.get(b, 0) + 1
                    rc_of[b] = rc
        total = sum(f["shared_bytes"] + f["exclusive_bytes"] for f in info.values())
        exclusive = sum(f["exclusive_bytes"] for f in info.values())
        per_path.append({"total": total, "exclusive": exclusive, "shared": total - exclusive,
                         "physical": len(refs) * BS,
                         "set_shared": sum(1 for b in refs if rc_of[b] > 1) * BS,
                         "set_exclusive": sum(1 for b in refs if refs[b] == rc_of[b]) * BS})
        blocks_of.append(set(refs))
    counts: dict[int, int] = {}
    for s in blocks_of:
        for b in s:
            counts[b] = counts.get(b, 0) + 1
    return per_path, {"shared_between": sum(1 for k in counts.values() if k >= 2) * BS}


def du(*paths) -> dict:
    r = run_cli("du", "--json", *paths)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_du_agrees_with_stat(tree):
    a, b = tree / "a", tree / "b"
    self_map = stat_of([b / "self"])[str(b / "self")]["extents"]
    assert any(rc == 2 for _, _, _, rc in self_map) and len({pb for _, pb, _, _ in self_map}) > 1
    paths = [a, b, a / "c", a / "big", tree]
    res = du(*paths)
    expected, _ = oracle([files_under(p) for p in paths])
    for p, want in zip(paths, expected):
        got = res["paths"][str(p)]
        assert {k: got[k] for k in want} == want, p
        assert got["physical"] == got["exclusive"] + got["set_shared"]      # a block of refcount 1 is mapped once
    # the whole tree holds every reference to its blocks: deleting it frees all it uses
    whole = res["paths"][str(tree)]
    assert whole["set_exclusive"] == whole["physical"]
    # a's blocks shared with b, c and outside are not a's to free; the rewritten ones are b's alone
    assert res["paths"][str(a)]["set_exclusive"] < res["paths"][str(a)]["physical"]


def test_hard_links_count_once(tree):
    a = tree / "a"
    got = du(a)["paths"][str(a)]
    per_name = sum(os.stat(os.path.join(d, n)).st_blocks * 512
                   for d, _, names in os.walk(a) for n in names)
    small = os.stat(a / "small").st_blocks * 512
    assert small and got["total"] == per_name - small       # a/small and a/c/small-link: one inode


def test_du_of_a_set_of_paths(tree):
    a, b = tree / "a", tree / "b"
    res = du(a, b)
    (sa, sb), between = oracle([files_under(a), files_under(b)])
    union_files = {**files_under(a), **files_under(b)}
    (su,), _ = oracle([union_files])
    assert len(res["sets"]) == 1
    s = res["sets"][0]
    assert s["paths"] == [str(a), str(b)]
    assert {k: s[k] for k in su} == su
    assert s["shared_between"] == between["shared_between"] > 0
    # and in text: one line per path and one for the set
    r = run_cli("du", "--raw", a, b)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4 and lines[1].split()[0] == str(sa["total"]) and lines[2].split()[0] == str(sb["total"])


def test_du_errors(tree, tmp_path):
    r = run_cli("du", tmp_path)
    assert r.returncode == 1 and "not inside a reflinkfs mount" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("du", tree / "missing")
    assert r.returncode == 1 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_du_of_more_paths_than_one_request_names(workdir):
    """The inode numbers of the paths go in one attribute name (255 bytes at most); past that, one request
    per path, and no figures for the set."""
    paths = []
    for i in range(100):
        p = workdir / f"f{i}"
        write(p, (i % 5 + 1) * BS, i)
        paths.append(p)
    res = du(*paths)
    want = stat_of(paths)
    for p in paths:
        info = want[str(p)]
        assert res["paths"][str(p)]["total"] == info["shared_bytes"] + info["exclusive_bytes"] > 0
    assert res["sets"] == [{"paths": [str(p) for p in paths],
                            "note": "too many paths for one request; no set figures"}]
