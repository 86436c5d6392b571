"""`clone -r` in the core (core/treeclone.py): structure, refusals, uncommitted data, staging and crashes.
fsck runs at teardown (conftest), so every test also proves the store stays consistent."""
from __future__ import annotations

import errno
import stat

import pytest

from reflinkfs.check import fsck_db
from reflinkfs.core import acl, treeclone
from reflinkfs.core.treeclone import Cred, TreeClone, clone_tree
from reflinkfs.errors import FsError

ROOT = 1
BS = 4096
U, G = 1000, 1000
NAMED = acl.pack([(acl.USER_OBJ, 6, 0), (acl.USER, 6, 65534), (acl.GROUP_OBJ, 4, 0), (acl.MASK, 6, 0),
                  (acl.OTHER, 4, 0)])


def path_ino(vol, path: str, parent: int = ROOT) -> int:
    ino = parent
    for part in path.split("/"):
        if part:
            ino = vol.lookup(ino, part.encode()).ino
    return ino


def tree_of(vol, ino: int) -> dict:
    """path -> (mode, uid, gid, rdev, size, target, xattrs, data, mtime, hard-link group), SRC-relative."""
    out, groups = {}, {}

    def walk(d: int, prefix: str) -> None:
        for _, name, a in vol.readdir(d):
            p = prefix + name.decode()
            xattrs = {n: vol.getxattr(a.ino, n) for n in vol.listxattr(a.ino)}
            data = bytes(vol.read(a.ino, 0, a.size)) if stat.S_ISREG(a.mode) else None
            target = vol.readlink(a.ino) if stat.S_ISLNK(a.mode) else None
            group = groups.setdefault(a.ino, len(groups)) if not stat.S_ISDIR(a.mode) and a.nlink > 1 else None
            holes = [lb for lb, _, _, _ in vol.extent_map(a.ino)] if stat.S_ISREG(a.mode) else None
            out[p] = (a.mode, a.uid, a.gid, a.rdev, a.size, a.nlink, target, xattrs, data, a.mtime_ns, group, holes)
            if stat.S_ISDIR(a.mode):
                walk(a.ino, p + "/")
    walk(ino, "")
    return out


def make_tree(vol) -> int:
    src = vol.mkdir(ROOT, b"src", 0o755, 0, 0).ino
    a = vol.mkdir(src, b"a", 0o750, 0, 0).ino
    vol.mkdir(src, b"empty", 0o700, 0, 0)
    deep = vol.mkdir(vol.mkdir(a, b"b", 0o755, 0, 0).ino, b"c", 0o755, 0, 0).ino
    f = vol.create(src, b"file", 0o644, 0, 0).ino
    vol.write(f, 0, b"x" * (5 * BS + 17))
    sparse = vol.create(a, b"sparse", 0o600, 0, 0).ino
    vol.write(sparse, 0, b"head")
    vol.write(sparse, 100 * BS, b"tail")
    vol.create(deep, b"empty-file", 0o640, 0, 0)
    vol.link(f, deep, b"hardlink")             # two names of one inode inside the tree
    vol.symlink(src, b"sym", b"a/b/c", 0, 0)
    vol.symlink(a, b"dangling", b"/no/such", 0, 0)
    vol.mknod(src, b"fifo", stat.S_IFIFO | 0o644, 0, 0)
    vol.mknod(src, b"dev", stat.S_IFCHR | 0o600, 0, 0, rdev=0x0103)
    vol.setxattr(f, b"user.note", b"hello")
    vol.setxattr(a, acl.ACCESS, NAMED)
    vol.setxattr(a, acl.DEFAULT, NAMED)
    return src


def test_structure_is_copied_and_every_block_shared(vol):
    src = make_tree(vol)
    outside = vol.create(ROOT, b"outside-link-target", 0o644, 0, 0).ino
    vol.link(outside, src, b"linked-from-outside")     # nlink 2 in SRC, 1 in DST
    vol.commit()
    written = vol.data.stats().bytes_written
    dst_root = clone_tree(vol, src, ROOT, b"dst")
    assert vol.data.stats().bytes_written == written, "a tree clone moves no data"
    want, have = tree_of(vol, src), tree_of(vol, dst_root.ino)
    assert set(want) == set(have)
    for p in want:
        w, h = want[p], have[p]
        if p == "linked-from-outside":
            assert (w[5], h[5]) == (2, 1)
            w, h = w[:5] + w[6:10], h[:5] + h[6:10]     # nlink and hard-link group differ
        assert w == h, p
    assert have["a/b/c/hardlink"][10] == have["file"][10] is not None
    assert have["a/sparse"][11] == [0, 100]
    assert vol.getattr(dst_root.ino).nlink == vol.getattr(src).nlink
    # every block is shared, none copied: refcount 2 everywhere (the hard link is one inode)
    f_dst = path_ino(vol, "dst/file")
    assert {rc for *_, rc in vol.extent_map(f_dst)} == {2}
    assert path_ino(vol, "dst/a/b/c/hardlink") == f_dst
    # copies are independent
    vol.write(f_dst, 0, b"changed")
    assert bytes(vol.read(path_ino(vol, "src/file"), 0, 7)) == b"xxxxxxx"


def test_small_batches_give_the_same_tree(vol):
    src = make_tree(vol)
    for i in range(30):
        vol.create(src, b"n%02d" % i, 0o644, 0, 0)
    d = clone_tree(vol, src, ROOT, b"dst", batch=3)
    assert tree_of(vol, src).keys() == tree_of(vol, d.ino).keys()


def test_uncommitted_data_is_in_the_clone(vol):
    src = vol.mkdir(ROOT, b"src", 0o755, 0, 0).ino
    f = vol.create(src, b"f", 0o644, 0, 0).ino
    vol.write(f, 0, b"a" * 3 * BS)
    vol.commit()
    vol.write(f, BS, b"NEW" * 100)             # not committed
    assert vol.dirty
    d = clone_tree(vol, src, ROOT, b"dst")
    assert bytes(vol.read(vol.lookup(d.ino, b"f").ino, BS, 300)) == b"NEW" * 100


def test_refusals_change_nothing(vol):
    src = make_tree(vol)
    vol.mkdir(ROOT, b"exists", 0o755, 0, 0)
    vol.commit()
    before = (vol.db.execute("SELECT COUNT(*) FROM inodes").fetchone(), vol.usage())
    cases = [
        ((src, ROOT, b"exists"), errno.EEXIST),
        ((src, src, b"inside"), errno.EINVAL),
        ((src, path_ino(vol, "src/a/b"), b"deeper"), errno.EINVAL),
        ((path_ino(vol, "src/file"), ROOT, b"x"), errno.ENOTDIR),
        ((src, path_ino(vol, "src/file"), b"x"), errno.ENOTDIR),
        ((src, ROOT, b"a/b"), errno.EINVAL),
    ]
    for args, code in cases:
        with pytest.raises(FsError) as e:
            clone_tree(vol, *args)
        assert e.value.errno == code, (args, e.value)
    assert (vol.db.execute("SELECT COUNT(*) FROM inodes").fetchone(), vol.usage()) == before
    assert treeclone.staging_names(vol.db) == []


def test_permissions_are_checked_as_cp_would_and_name_the_entry(vol):
    src = vol.mkdir(ROOT, b"src", 0o755, U, G).ino
    sub = vol.mkdir(src, b"sub", 0o755, U, G).ino
    secret = vol.create(sub, b"secret", 0o600, 0, 0).ino
    vol.write(secret, 0, b"s")
    user = Cred(U, G, frozenset({G}))
    other = Cred(2000, 2000, frozenset({2000}))
    with pytest.raises(FsError) as e:
        clone_tree(vol, src, ROOT, b"dst", user)
    assert e.value.errno == errno.EACCES and "destination" in str(e.value)
    vol.setattr(ROOT, mode=0o777)
    with pytest.raises(FsError) as e:
        clone_tree(vol, src, ROOT, b"dst", user)
    assert e.value.errno == errno.EACCES and e.value.path == b"sub/secret" and "sub/secret" in str(e.value)
    vol.setattr(secret, mode=0o644)
    clone_tree(vol, src, ROOT, b"dst", user)
    # the clone is the caller's: a user cannot keep someone else's ownership (as with cp -a)
    assert vol.getattr(path_ino(vol, "dst/sub/secret")).uid == U
    # a directory it may not list; then one it may list only through an ACL entry naming it
    vol.setattr(sub, mode=0o700)
    with pytest.raises(FsError) as e:
        clone_tree(vol, src, ROOT, b"dst2", other)
    assert e.value.errno == EACCES_ and e.value.path == b"sub"
    vol.setxattr(sub, acl.ACCESS, acl.pack([(acl.USER_OBJ, 7, 0), (acl.USER, 5, 2000), (acl.GROUP_OBJ, 0, 0),
                                            (acl.MASK, 5, 0), (acl.OTHER, 0, 0)]))
    clone_tree(vol, src, ROOT, b"dst2", other)
    # devices only for root; search permission above the source
    vol.mknod(src, b"dev", stat.S_IFBLK | 0o644, U, G, rdev=0x0801)
    with pytest.raises(FsError) as e:
        clone_tree(vol, src, ROOT, b"dst3", user)
    assert e.value.errno == errno.EPERM and e.value.path == b"dev"
    clone_tree(vol, src, ROOT, b"dst3", Cred(0, 0))
    assert treeclone.staging_names(vol.db) == []


EACCES_ = errno.EACCES


def test_an_interrupted_clone_leaves_a_clean_store_and_no_dst(open_volume, store):
    vol = open_volume()
    src = make_tree(vol)
    for i in range(50):
        f = vol.create(src, b"f%02d" % i, 0o644, 0, 0).ino
        vol.write(f, 0, b"z" * BS * 3)
    vol.commit()
    usage = vol.usage()
    tc = TreeClone(vol, src, ROOT, b"dst", batch=7)
    while tc.progress.phase == "scan":
        assert tc.step()
    for _ in range(5):
        assert tc.step()
    assert tc.progress.phase == "copy" and 0 < tc.progress.entries_done < tc.progress.entries_total
    vol.commit()          # a commit catches the staging tree half built: consistent, invisible
    assert len(treeclone.staging_names(vol.db)) == 1
    assert fsck_db(vol.db, vol.data.path).findings == []
    with pytest.raises(FsError):
        vol.lookup(ROOT, b"dst")
    assert [n for _, n, _ in vol.readdir(ROOT)] == [b"src"]
    # the daemon dies here; the next open frees the staging tree
    vol.data.close()
    vol.db.close()
    import os
    os.close(vol._lock_fd)
    vol.db = None
    vol2 = open_volume()
    assert treeclone.staging_names(vol2.db) == []
    assert vol2.usage() == usage
    assert [n for _, n, _ in vol2.readdir(ROOT)] == [b"src"]


def test_a_failed_publish_frees_the_staging_tree(vol):
    src = make_tree(vol)
    tc = TreeClone(vol, src, ROOT, b"dst", batch=4)
    while tc.step():
        pass
    vol.mkdir(ROOT, b"dst", 0o755, 0, 0)       # someone took the name meanwhile
    rows = vol.db.execute("SELECT COUNT(*) FROM inodes").fetchone()[0]
    with pytest.raises(FsError) as e:
        tc.publish()
    assert e.value.errno == errno.EEXIST
    assert treeclone.staging_names(vol.db) == []
    assert vol.db.execute("SELECT COUNT(*) FROM inodes").fetchone()[0] < rows


def _clone_cost(vol, name: bytes, src: int) -> int:
    """SQLite virtual-machine steps (in units of 1000) that cloning src costs: a measure of work that
    does not depend on the machine's speed."""
    count = [0]

    def tick():
        count[0] += 1
        return 0
    vol.db.set_progress_handler(tick, 1000)
    try:
        clone_tree(vol, src, ROOT, name, batch=50)
    finally:
        vol.db.set_progress_handler(None, 0)
    return count[0]


def test_a_step_costs_its_batch_not_the_store(vol):
    """The statements of a step reach the rows of its own batch through indexes: cloning the same tree
    costs the same in a store with many other files (a join that scanned all extents or xattrs per
    step made a tree clone quadratic)."""
    src = vol.mkdir(ROOT, b"src", 0o755, 0, 0).ino
    for i in range(200):
        f = vol.create(src, b"f%03d" % i, 0o644, 0, 0).ino
        vol.write(f, 0, b"s" * 100)
        vol.setxattr(f, b"user.k", b"v")
    alone = _clone_cost(vol, b"dst1", src)
    other = vol.mkdir(ROOT, b"other", 0o755, 0, 0).ino
    for i in range(3000):
        f = vol.create(other, b"o%04d" % i, 0o644, 0, 0).ino
        vol.write(f, 0, b"o" * 100)
        vol.setxattr(f, b"user.k", b"v")
    crowded = _clone_cost(vol, b"dst2", src)
    assert crowded < alone * 1.5, (alone, crowded)


def test_the_batch_adapts_to_the_step_time(vol, monkeypatch):
    src = vol.mkdir(ROOT, b"src", 0o755, 0, 0).ino
    for i in range(300):
        vol.create(src, b"f%03d" % i, 0o644, 0, 0)
    monkeypatch.setattr(treeclone, "BATCH", 10)
    monkeypatch.setattr(treeclone, "STEP_SECONDS", 10.0)     # every step is far under budget: batches grow
    tc = TreeClone(vol, src, ROOT, b"dst")
    sizes = []
    while tc.step():
        sizes.append(tc.batch)
    assert sizes[0] == 10 and max(sizes) > 10
    tc.publish()
    monkeypatch.setattr(treeclone, "STEP_SECONDS", 0.0)      # every step is over budget: batches shrink
    monkeypatch.setattr(treeclone, "BATCH_MIN", 1)
    tc = TreeClone(vol, src, ROOT, b"dst2")
    sizes = []
    while tc.step():
        sizes.append(tc.batch)
    assert sizes[-1] < 10
    tc.publish()
    assert tree_of(vol, src).keys() == tree_of(vol, vol.lookup(ROOT, b"dst2").ino).keys()
