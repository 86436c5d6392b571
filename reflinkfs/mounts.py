"""The mount table and the store lock, as the commands see them: which reflinkfs mounts exist, what is
mounted on a path, whether a mount is dead, who holds a store.

Everything here reads /proc (never stat or os.path.ismount, which block on a wedged FUSE daemon), except
answers_enotconn, which asks the mount itself.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass

from .errors import StoreError


def _unescape(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def reflinkfs_mounts() -> dict[str, str]:
    """mountpoint -> store path, for every reflinkfs mount of this machine."""
    found = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            src, mnt, fstype = line.split()[:3]
            if fstype == "fuse.reflinkfs" and src.startswith("reflinkfs:"):
                found[_unescape(mnt)] = _unescape(src)[len("reflinkfs:"):]
    return found


@dataclass
class MountEntry:
    """One line of /proc/self/mountinfo."""
    mount_id: int
    parent_id: int
    mountpoint: str
    fstype: str
    source: str

    @property
    def store(self) -> str | None:
        """The store of a reflinkfs mount (its fsname is reflinkfs:<absolute store path>), else None."""
        if self.fstype == "fuse.reflinkfs" and self.source.startswith("reflinkfs:"):
            return self.source[len("reflinkfs:"):]
        return None


def top_mount(path) -> MountEntry | None:
    """The mount that path resolves to if something is mounted on path itself (the topmost of a stack),
    else None. Reads /proc/self/mountinfo only: never blocks on a dead or wedged FUSE daemon."""
    target = os.path.realpath(path)
    here = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) != target:
                continue
            tail = fields[fields.index("-") + 1:]
            here.append(MountEntry(int(fields[0]), int(fields[1]), target, tail[0], _unescape(tail[1])))
    below = {e.parent_id for e in here}
    tops = [e for e in here if e.mount_id not in below]
    found = tops or here
    return found[-1] if found else None


def is_mounted(path) -> bool:
    """Whether something is mounted on path; reads /proc/self/mountinfo, which never blocks on a wedged
    FUSE daemon (unlike stat or os.path.ismount)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == target for line in f)


def lock_holders(store) -> list[int]:
    """Pids of the processes that have STORE/lock open: the daemon of a mounted store."""
    from .meta.schema import LOCK_NAME
    lock = os.path.realpath(os.path.join(store, LOCK_NAME))
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == lock:
                    pids.append(int(pid))
                    break
            except OSError:
                continue
    return pids


def pid_alive(pid: int) -> bool:
    """Whether process pid exists and is not a zombie (a killed daemon that its parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def store_lock(store: str):
    """Hold the store's lock for a with-block if no process holds it; yields False (holding nothing) when
    one does: the daemon of a live mount, a fsck, or another command holding it for a moment; None when
    the lock cannot be opened (the store directory is gone)."""
    from .meta.schema import LOCK_NAME
    try:
        fd = os.open(os.path.join(store, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = True
        except BlockingIOError:
            got = False
        yield got
    finally:
        os.close(fd)


def answers_enotconn(path: str) -> bool:
    """Whether the mount on path is dead: the kernel itself answers ENOTCONN once its daemon is gone
    (ECONNABORTED for a request caught in the daemon's death). statfs, because the kernel always passes
    it to the daemon: stat may be answered from cached attributes for a second after the daemon died."""
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def detach(mnt: str) -> None:
    """Lazily detach the mount on mnt (processes still inside keep getting ENOTCONN)."""
    import subprocess
    r = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]
        raise StoreError(f"{mnt}: cannot detach the dead mount: {msg.removeprefix('fusermount3: ')}")


def mounts_of(store: str) -> list[str]:
    real = os.path.realpath(store)
    return [m for m, s in reflinkfs_mounts().items() if os.path.realpath(s) == real]


def holders_text(store: str) -> str:
    pids = lock_holders(store)
    return f"process {', '.join(map(str, pids))}" if pids else "another process"


def store_of(mountpoint: str) -> str:
    mnt = os.path.realpath(mountpoint)
    try:
        return reflinkfs_mounts()[mnt]
    except KeyError:
        raise StoreError(f"{mountpoint}: not a reflinkfs mount") from None

