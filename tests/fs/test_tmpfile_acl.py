"""The core's O_TMPFILE inodes and POSIX ACLs, driven directly (the mount tests drive them through the
kernel: tests/mount/test_tmpfile.py, tests/mount/test_acl.py)."""
from __future__ import annotations

import errno
import stat

import pytest

from reflinkfs.core import acl
from reflinkfs.errors import FsError

ROOT = 1
U, G = 1000, 1000


def err(code, fn, *args):
    with pytest.raises(FsError) as e:
        fn(*args)
    assert e.value.errno == code, errno.errorcode.get(e.value.errno)


def A(*entries) -> bytes:
    return acl.pack(list(entries))


MINIMAL = A((acl.USER_OBJ, 6, 0), (acl.GROUP_OBJ, 4, 0), (acl.OTHER, 0, 0))
NAMED = A((acl.USER_OBJ, 6, 0), (acl.USER, 6, 65534), (acl.GROUP_OBJ, 4, 0), (acl.MASK, 6, 0),
          (acl.OTHER, 4, 0))


# -- O_TMPFILE ----------------------------------------------------------------------------------------
def test_tmpfile_is_an_open_file_in_no_directory_freed_at_last_reference(vol):
    a = vol.tmpfile(ROOT, 0o666, U, G, umask=0o022)
    assert (stat.S_IFMT(a.mode), stat.S_IMODE(a.mode), a.nlink, a.uid, a.gid) == (stat.S_IFREG, 0o644, 0, U, G)
    assert [n for _, n, _ in vol.readdir(ROOT)] == []
    vol.opened(a.ino)
    vol.looked_up(a.ino)
    vol.write(a.ino, 0, b"x" * 10000)
    vol.released(a.ino)
    vol.forget(a.ino, 1)
    err(errno.ENOENT, vol.getattr, a.ino)
    assert vol.usage()["physical_bytes"] == 0


def test_tmpfile_can_be_linked_once(vol):
    a = vol.tmpfile(ROOT, 0o600, U, G)
    vol.opened(a.ino)
    vol.write(a.ino, 0, b"data")
    assert vol.link(a.ino, ROOT, b"named").nlink == 1
    assert vol.lookup(ROOT, b"named").ino == a.ino
    vol.unlink(ROOT, b"named")
    err(errno.ENOENT, vol.link, a.ino, ROOT, b"again")   # now an ordinary unlinked file
    vol.released(a.ino)
    err(errno.ENOENT, vol.getattr, a.ino)


def test_an_unlinked_open_file_cannot_be_linked(vol):
    ino = vol.create(ROOT, b"f", 0o644, U, G).ino
    vol.opened(ino)
    vol.unlink(ROOT, b"f")
    err(errno.ENOENT, vol.link, ino, ROOT, b"back")
    vol.released(ino)


def test_tmpfile_in_a_removed_directory_fails(vol):
    d = vol.mkdir(ROOT, b"d", 0o755, U, G).ino
    vol.opened(d)
    vol.rmdir(ROOT, b"d")
    err(errno.ENOENT, vol.tmpfile, d, 0o600, U, G)
    vol.released(d)


# -- ACL values --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    b"", b"\x02\x00\x00", b"\x01\x00\x00\x00" + MINIMAL[4:], MINIMAL + b"\x00",
    A((acl.USER_OBJ, 6, 0), (acl.OTHER, 0, 0)),                                   # no group entry
    A((acl.GROUP_OBJ, 4, 0), (acl.USER_OBJ, 6, 0), (acl.OTHER, 0, 0)),             # out of order
    A((acl.USER_OBJ, 6, 0), (acl.USER, 6, 5), (acl.GROUP_OBJ, 4, 0), (acl.OTHER, 0, 0)),   # no mask
    A((acl.USER_OBJ, 6, 0), (acl.USER, 6, 5), (acl.USER, 6, 5), (acl.GROUP_OBJ, 4, 0), (acl.MASK, 6, 0),
      (acl.OTHER, 0, 0)),                                                         # a user twice
    A((acl.USER_OBJ, 8, 0), (acl.GROUP_OBJ, 4, 0), (acl.OTHER, 0, 0)),             # bad permissions
    A((acl.USER_OBJ, 6, 0), (0x40, 4, 0), (acl.GROUP_OBJ, 4, 0), (acl.OTHER, 0, 0)),  # bad tag
])
def test_malformed_acls_are_einval(vol, value):
    ino = vol.create(ROOT, b"f", 0o600, U, G).ino
    err(errno.EINVAL, vol.setxattr, ino, acl.ACCESS, value)
    err(errno.ENODATA, vol.getxattr, ino, acl.ACCESS)
    assert stat.S_IMODE(vol.getattr(ino).mode) == 0o600


def test_access_acl_sets_the_mode_and_chmod_sets_the_acl(vol):
    ino = vol.create(ROOT, b"f", 0o4600, U, G).ino
    vol.setxattr(ino, acl.ACCESS, NAMED)
    assert vol.getxattr(ino, acl.ACCESS) == NAMED
    assert stat.S_IMODE(vol.getattr(ino).mode) == 0o4664        # group bits = mask; setuid kept
    vol.setattr(ino, mode=0o640)
    assert acl.parse(vol.getxattr(ino, acl.ACCESS)) == [
        (acl.USER_OBJ, 6, acl.UNDEFINED_ID), (acl.USER, 6, 65534), (acl.GROUP_OBJ, 4, acl.UNDEFINED_ID),
        (acl.MASK, 4, acl.UNDEFINED_ID), (acl.OTHER, 0, acl.UNDEFINED_ID)]
    vol.setxattr(ino, acl.ACCESS, MINIMAL)        # the mode says it all: nothing stored, as on ext4
    err(errno.ENODATA, vol.getxattr, ino, acl.ACCESS)
    assert stat.S_IMODE(vol.getattr(ino).mode) == 0o640


def test_default_acl_only_on_directories(vol):
    ino = vol.create(ROOT, b"f", 0o600, U, G).ino
    err(errno.EACCES, vol.setxattr, ino, acl.DEFAULT, NAMED)
    d = vol.mkdir(ROOT, b"d", 0o755, U, G).ino
    vol.setxattr(d, acl.DEFAULT, NAMED)
    assert vol.getxattr(d, acl.DEFAULT) == NAMED
    assert stat.S_IMODE(vol.getattr(d).mode) == 0o755          # a default ACL leaves the mode alone


def test_new_inodes_inherit_the_default_acl_instead_of_the_umask(vol):
    d = vol.mkdir(ROOT, b"d", 0o755, U, G).ino
    vol.setxattr(d, acl.DEFAULT, NAMED)
    f = vol.create(d, b"f", 0o666, U, G, umask=0o077)
    assert stat.S_IMODE(f.mode) == 0o664                        # 0666 masked by the ACL, not the umask
    assert acl.parse(vol.getxattr(f.ino, acl.ACCESS))[3][:2] == (acl.MASK, 6)
    err(errno.ENODATA, vol.getxattr, f.ino, acl.DEFAULT)
    sub = vol.mkdir(d, b"sub", 0o750, U, G, umask=0o077)
    assert stat.S_IMODE(sub.mode) == 0o640                      # 0750 masked by user::rw- mask::rw- other::r--
    assert vol.getxattr(sub.ino, acl.DEFAULT) == NAMED
    t = vol.tmpfile(d, 0o600, U, G, umask=0o077)
    assert stat.S_IMODE(t.mode) == 0o600 and acl.parse(vol.getxattr(t.ino, acl.ACCESS))[3][:2] == (acl.MASK, 0)
    s = vol.symlink(d, b"l", b"f", U, G)
    assert stat.S_IMODE(s.mode) == 0o777 and acl.ACCESS not in vol.listxattr(s.ino)
    vol.opened(t.ino)
    vol.released(t.ino)
    # without a default ACL the umask applies
    g = vol.create(ROOT, b"g", 0o666, U, G, umask=0o027)
    assert stat.S_IMODE(g.mode) == 0o640 and vol.listxattr(g.ino) == []


@pytest.mark.damages_store
def test_fsck_finds_acls_that_disagree_with_the_mode(store):
    import sqlite3

    from reflinkfs.check import fsck
    from reflinkfs.core.volume import Volume
    with Volume.open(store) as v:
        f = v.create(ROOT, b"f", 0o600, U, G).ino
        v.setxattr(f, acl.ACCESS, NAMED)
        d = v.mkdir(ROOT, b"d", 0o755, U, G).ino
        v.setxattr(d, acl.DEFAULT, NAMED)
        g = v.create(ROOT, b"g", 0o600, U, G).ino
    assert fsck(store).findings == []
    db = sqlite3.connect(f"{store}/meta.db")
    with db:
        db.execute("UPDATE inodes SET mode=? WHERE ino=?", (stat.S_IFREG | 0o644, f))
        db.execute("INSERT INTO xattrs(ino, name, value) VALUES (?, ?, ?)", (g, acl.DEFAULT, NAMED))
        db.execute("UPDATE xattrs SET value=? WHERE ino=? AND name=?", (NAMED[:-1], d, acl.DEFAULT))
    db.close()
    findings = fsck(store).findings
    assert f"acl: inode {f}: mode 644 and access ACL (664) disagree" in findings
    assert f"acl: inode {g} is not a directory but has a default ACL" in findings
    assert any(x.startswith(f"acl: inode {d} has a malformed system.posix_acl_default") for x in findings)
