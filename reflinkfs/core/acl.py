"""POSIX ACLs as Linux stores them: the values of system.posix_acl_access / system.posix_acl_default.

The kernel checks permissions against ACLs itself (a FUSE mount that negotiated FUSE_POSIX_ACL); the
store keeps them as the extended attributes they are, and the core keeps them consistent with the mode,
which on Linux is the filesystem's job (for FUSE, the daemon's):
- setting an access ACL sets the mode's permission bits from it (owner = USER_OBJ, group = MASK if there
  is one, else GROUP_OBJ, other = OTHER); an ACL the mode says all of is not stored (as on ext4);
- chmod changes the access ACL's USER_OBJ, MASK (or GROUP_OBJ) and OTHER entries to the new bits;
- a new inode in a directory with a default ACL gets that ACL masked by the requested mode as its access
  ACL, and a new directory gets the default ACL too; the umask is then not applied. Without a default
  ACL the mode is masked by the umask.

Value format (little-endian): a 4-byte version (2), then 8-byte entries: tag (2 bytes), perm (2), id (4).
"""
from __future__ import annotations

import errno
import struct

from ..errors import FsError

ACCESS = b"system.posix_acl_access"
DEFAULT = b"system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)

VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
_HEAD = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")

Entry = tuple[int, int, int]   # (tag, perm, id)


def parse(value: bytes) -> list[Entry]:
    """The entries of an ACL value, checked as Linux checks them (posix_acl_valid); EINVAL if malformed."""
    if len(value) < _HEAD.size or (len(value) - _HEAD.size) % _ENTRY.size:
        raise FsError(errno.EINVAL, "malformed ACL: bad length")
    if _HEAD.unpack_from(value)[0] != VERSION:
        raise FsError(errno.EINVAL, "malformed ACL: unknown version")
    entries = [_ENTRY.unpack_from(value, off) for off in range(_HEAD.size, len(value), _ENTRY.size)]
    seen: dict[int, int] = {}
    last_named = {USER: -1, GROUP: -1}
    order = (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER)
    pos = 0
    for tag, perm, id_ in entries:
        if tag not in order or perm & ~7:
            raise FsError(errno.EINVAL, "malformed ACL: bad tag or permissions")
        if order.index(tag) < pos:
            raise FsError(errno.EINVAL, "malformed ACL: entries out of order")
        pos = order.index(tag)
        seen[tag] = seen.get(tag, 0) + 1
        if tag in (USER, GROUP):
            if id_ <= last_named[tag] or id_ == UNDEFINED_ID:
                raise FsError(errno.EINVAL, "malformed ACL: named entries unsorted or repeated")
            last_named[tag] = id_
        elif seen[tag] > 1:
            raise FsError(errno.EINVAL, "malformed ACL: repeated entry")
    if not all(seen.get(t) for t in (USER_OBJ, GROUP_OBJ, OTHER)):
        raise FsError(errno.EINVAL, "malformed ACL: missing owner, group or other entry")
    if (seen.get(USER) or seen.get(GROUP)) and not seen.get(MASK):
        raise FsError(errno.EINVAL, "malformed ACL: named entries need a mask")
    return entries


def pack(entries: list[Entry]) -> bytes:
    return _HEAD.pack(VERSION) + b"".join(
        _ENTRY.pack(tag, perm, id_ if tag in (USER, GROUP) else UNDEFINED_ID) for tag, perm, id_ in entries)


def _perm(entries: list[Entry], tag: int) -> int:
    return next(p for t, p, _ in entries if t == tag)


def mode_bits(entries: list[Entry]) -> int:
    """The rwxrwxrwx bits an access ACL implies."""
    group = MASK if any(t == MASK for t, _, _ in entries) else GROUP_OBJ
    return (_perm(entries, USER_OBJ) << 6) | (_perm(entries, group) << 3) | _perm(entries, OTHER)


def is_minimal(entries: list[Entry]) -> bool:
    """True when the mode says everything this ACL says (owner, group and other entries only)."""
    return all(t in (USER_OBJ, GROUP_OBJ, OTHER) for t, _, _ in entries)


def chmod(entries: list[Entry], mode: int) -> list[Entry]:
    """The access ACL after chmod(mode): owner, mask (or group, without a mask) and other follow it."""
    group = MASK if any(t == MASK for t, _, _ in entries) else GROUP_OBJ
    new = {USER_OBJ: (mode >> 6) & 7, group: (mode >> 3) & 7, OTHER: mode & 7}
    return [(t, new.get(t, p), i) for t, p, i in entries]


def inherit(default: list[Entry], mode: int) -> tuple[int, list[Entry] | None]:
    """A new inode's mode and access ACL from its directory's default ACL and the requested mode: the
    ACL's owner, mask (or group) and other entries are masked by the mode's, and the mode takes them.
    The ACL is None when the mode says all of it."""
    group = MASK if any(t == MASK for t, _, _ in default) else GROUP_OBJ
    req = {USER_OBJ: (mode >> 6) & 7, group: (mode >> 3) & 7, OTHER: mode & 7}
    acl = [(t, p & req[t] if t in req else p, i) for t, p, i in default]
    new_mode = (mode & ~0o777) | mode_bits(acl)
    return new_mode, (None if is_minimal(acl) else acl)
