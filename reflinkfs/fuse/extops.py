"""copy_file_range and fallocate for pyfuse3, without patching pyfuse3.

Why this exists
---------------
pyfuse3 3.5 fills a ``struct fuse_lowlevel_ops`` table without
``copy_file_range`` and ``fallocate`` and passes it to libfuse's
``fuse_session_new()``.  The kernel therefore never sends those requests to
us: copy_file_range falls back to a read/write copy through the page cache,
and fallocate fails (glibc's posix_fallocate then emulates it by writing).

Mechanism
---------
The C extension ``reflinkfs.fuse._extops`` defines its own
``fuse_session_new`` carrying the same symbol version as libfuse
(``fuse_session_new@@FUSE_3.0``, see ``extops.map``).  :func:`load` imports it
with ``RTLD_GLOBAL``, which puts it into the process-wide symbol scope ahead of
libfuse3.  When pyfuse3's extension module is loaded afterwards, the dynamic
linker binds its reference ``fuse_session_new@FUSE_3.0`` to *our* definition.
Ours copies pyfuse3's ops table, sets ``copy_file_range`` / ``fallocate`` to
C handlers, and forwards to the real function via
``dlvsym(RTLD_NEXT, "fuse_session_new", "FUSE_3.0")``.  ``fuse_session_destroy``
is interposed the same way, only so that late replies after the session is
gone are dropped instead of touching freed memory.

``fuse_session_process_buf`` is interposed as well: Linux 6.18 first sends
``FUSE_COPY_FILE_RANGE_64``, which libfuse 3.14 answers ENOSYS, and when two
first copies race the kernel can take the second ENOSYS as meaning the older
request is unsupported too and switch copy_file_range off for the mount (the
kernel then copies bytes through the page cache, 64 KiB at a time). The C
side relabels the newer request as the older one, whose reply reads the same
on little-endian machines, and keeps each reply's count under 4 GiB.

The C handlers run inside ``fuse_session_process_buf()`` (trio's thread, GIL
held), wrap the ``fuse_req_t`` in a :class:`Request` and call the Python
handler registered with :func:`set_handlers`.

Load-order pitfall
------------------
Symbol binding happens when pyfuse3's ``.so`` is loaded (immediately, or on
the first call with lazy binding, but in both cases only objects already in
the global scope are candidates).  If ``import pyfuse3`` happened before
:func:`load`, pyfuse3 is already bound to libfuse's own ``fuse_session_new``;
loading us later changes nothing and the handlers are silently never called.
So :func:`load` must run before the first ``import pyfuse3`` in the process
(typically first thing in the CLI entry point, before importing modules that
import pyfuse3).  :func:`load` refuses (raises :class:`LoadOrderError`) when
pyfuse3 is already in ``sys.modules``; ``load(strict=False)`` returns a
:class:`LoadStatus` instead.  After ``pyfuse3.init()``, :func:`interposed`
tells whether the interposition really happened.

Handler protocol
----------------
``copy_file_range(req, ino_in, fh_in, off_in, ino_out, fh_out, off_out, length, flags)``
and ``fallocate(req, ino, fh, mode, offset, length)``.

* Plain callables must reply exactly once, now or later (from any thread):
  ``req.reply_write(nbytes)`` (copy_file_range) or ``req.reply_err(errno)``
  (``0`` = success, e.g. for fallocate).  A second reply raises
  ``RuntimeError``; a Request garbage-collected without reply answers EIO.
* ``async def`` handlers (through this module's :func:`set_handlers`) are
  run as a trio system task.  If they return without replying, the return
  value is the reply: an int byte count for copy_file_range, ``None``/``0``
  for fallocate success.  ``OSError`` replies its errno, any other exception
  EIO.
* If no handler is registered, or the handler raises synchronously, the C
  side replies ENOSYS (copy_file_range; the kernel then disables the op for
  this mount and does a generic read/write copy) or EOPNOTSUPP (fallocate).
  Nothing is printed; see :func:`last_exception`.

``req.uid``, ``req.gid`` and ``req.pid`` give the request context.

Reads and writes
----------------
The same table copy routes ``read`` through a C handler.  Until
:func:`set_read_handler` registers a Python callable it forwards every read to
pyfuse3's own handler.  With one, ``read(fh, off, size)`` is called
synchronously and returns a list of buffers (``bytes``/``memoryview``), which
the C side passes to ``fuse_reply_iov()`` as they are: a reply made of several
cache buffers is never copied into one new buffer, and no coroutine is created
per read.  Returning an int replies that errno; an exception replies EIO.

Writes go the same way once :func:`set_write_handler` registers ``write(fh, off, data)``: it is
called synchronously with the request's data and returns the count written, ``-errno``, or None to
pass the request on to pyfuse3's own (async) write handler, for a write that has to wait; an exception
replies EIO.  The data never changes.  A small write's data is ``bytes`` (one copy out of libfuse's
receive buffer, as pyfuse3 makes); a write of at least half a receive buffer (a 1 MiB write) comes as
a ``WriteData``, a read-only buffer over the receive buffer itself, with no copy.  A handler that keeps
a reference to it (a memoryview counts) takes the receive buffer over, and the session receives its
next requests into another (reused from a small pool, or newly allocated); one that keeps nothing
leaves the buffer to the session.

:func:`set_meta_handlers` does the same for lookup, getattr, unlink and forget, the requests that
walking, stat-ing and removing files are made of: ``lookup(parent, name)`` and ``getattr(ino)`` return
the attributes as a tuple ``(ino, mode, nlink, uid, gid, rdev, size, blksize, blocks, atime_ns,
mtime_ns, ctime_ns)`` (``blocks`` in 512-byte units; replied with the timeouts given to
``set_meta_handlers``), ``unlink(parent, name)`` returns 0, and each returns an errno (an int > 0) to
fail or None to pass the request on to pyfuse3; ``forget(list of (ino, nlookup))`` has no reply.

:func:`set_file_handlers` does it for opening and closing files: ``open(ino, flags, pid)`` returns
the new file handle or ``-errno``, ``create(parent, name, mode, flags, uid, gid, umask, pid)``
returns ``(fh, attributes)`` (attributes as lookup returns them) or ``-errno``, and
``release(fh)`` returns 0 or an errno; None passes the request on.  ``tmpfile(parent, mode, flags,
uid, gid, umask, pid)`` answers an ``O_TMPFILE`` open (FUSE_TMPFILE, which pyfuse3 does not register)
as create does; without it the request gets ENOSYS, and the kernel then refuses ``O_TMPFILE`` on the
mount with EOPNOTSUPP.  The file info replied carries
the ``direct_io`` and ``keep_cache`` given to ``set_file_handlers``.  With ``no_flush=True`` a
FLUSH is answered ENOSYS, which tells the kernel that close() has nothing to wait for here: it sends
no FLUSH again on that mount (for a filesystem whose flush does nothing).

:func:`set_dont_mask` wraps pyfuse3's ``init`` to ask for ``FUSE_CAP_DONT_MASK``: the kernel then
sends create, mkdir, mknod and tmpfile modes unmasked, with the umask beside them, and the
filesystem applies the umask, or the directory's default ACL instead (POSIX ACLs need it: without
it the kernel applies the umask itself, even where a default ACL should replace it).
:func:`set_lseek_handler` does it for lseek(2)'s SEEK_DATA and SEEK_HOLE, the only whence values the
kernel sends to a daemon (it does SEEK_SET, SEEK_CUR and SEEK_END itself; the C side answers any other
EINVAL): ``lseek(fh, off, whence)`` returns the new offset or ``-errno``, or None to pass the request on
to pyfuse3, which has no lseek and answers ENOSYS; the kernel then answers SEEK_DATA and SEEK_HOLE on
that mount itself, as if the whole file were data, and never asks again.

:func:`set_dir_handlers` does it for listing directories: ``opendir(ino)`` and ``releasedir(fh)``
answer as open and release do, and ``readdir(fh, off, size)`` returns the entries from ``off`` on,
as many as may fit in ``size`` bytes, as a list of ``(name, attributes, next_off)`` (or an errno, or
None); the C side replies READDIRPLUS with those that fit and calls ``looked_up(ino)`` for each of them
but "." and "..", which the kernel counts as lookups.

Chains: pyfuse3's loop takes every request through trio (a lock, ``wait_readable``, a task
switch), which costs more than a cached read itself.  After a request a handler answered (a read, a
write, or one of the metadata, file and directory requests above), the C side waits up to :func:`set_chain_wait`
microseconds (default 100) for the next request and processes it at once; it goes on while the
requests are such requests.  The first other request (or one a handler passes on to pyfuse3) ends
the chain and is processed the usual way: pyfuse3's loop awaits its
coroutine as soon as the chain returns.  A chain
holds the loop for at most 256 requests or 2 ms.  ``counts()['chained']`` counts the requests
received by chains.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import os
import sys
from typing import Any, Callable

__all__ = [
    "LoadOrderError",
    "LoadStatus",
    "load",
    "set_handlers",
    "set_read_handler",
    "set_write_handler",
    "set_meta_handlers",
    "set_file_handlers",
    "set_lseek_handler",
    "set_dir_handlers",
    "set_dont_mask",
    "set_chain_wait",
    "interposed",
    "counts",
    "negotiated",
    "last_exception",
]

_ext = None  # the loaded reflinkfs.fuse._extops module
_last_async_exc: BaseException | None = None  # raised by an async handler task


class LoadOrderError(RuntimeError):
    """pyfuse3 was imported before extops.load(); interposition cannot work."""


@dataclasses.dataclass(frozen=True)
class LoadStatus:
    loaded: bool          # the C extension is importable/imported
    effective: bool       # it was loaded before pyfuse3, so it will interpose
    reason: str = ""

    def __bool__(self) -> bool:
        return self.effective


_status = LoadStatus(False, False, "load() not called")


def load(strict: bool = True) -> LoadStatus:
    """Load the C extension into the global symbol scope.

    Must be called before the first ``import pyfuse3``.  Idempotent.
    With ``strict=True`` (default) raises :class:`LoadOrderError` if pyfuse3
    was imported first, and ``ImportError`` if the extension is missing.
    With ``strict=False`` returns a falsy :class:`LoadStatus` instead.
    """
    global _ext, _status
    if _ext is not None:
        return _status
    if "pyfuse3" in sys.modules:
        status = LoadStatus(False, False,
                            "pyfuse3 was imported before reflinkfs.fuse.extops.load(); "
                            "fuse_session_new is already bound to libfuse")
        if strict:
            raise LoadOrderError(status.reason)
        return status
    old = sys.getdlopenflags()
    sys.setdlopenflags(old | os.RTLD_GLOBAL)
    try:
        from . import _extops
    except ImportError as exc:
        if strict:
            raise
        return LoadStatus(False, False, f"cannot import reflinkfs.fuse._extops: {exc}")
    finally:
        sys.setdlopenflags(old)
    _ext = _extops
    _status = LoadStatus(True, True)
    return _status


def _require():
    if _ext is None:
        raise RuntimeError("reflinkfs.fuse.extops.load() has not been called")
    return _ext


def interposed() -> bool:
    """True once pyfuse3's fuse_session_new() went through our wrapper."""
    return _ext is not None and _ext.interposed()


def negotiated() -> dict | None:
    """What INIT agreed with the kernel: ``{'libfuse': version, 'protocol': (major, minor),
    'direct_io_allow_mmap': bool}`` (shared mappings of direct_io files), or None before INIT."""
    return _require().negotiated()


def counts() -> dict[str, int]:
    """Requests received: {'copy_file_range', 'copy_file_range_64', 'fallocate', 'read', 'default_replies',
    'dropped', 'chained', 'write', 'write_passed'} ('copy_file_range_64': those of the copy_file_range
    requests the kernel sent as FUSE_COPY_FILE_RANGE_64; 'read' counts only reads served by the handler
    of set_read_handler; 'write' the writes given to the handler of set_write_handler, 'write_passed'
    those it passed on to pyfuse3; 'chained': requests received by a chain, of any kind)."""
    return _require().counts()


def last_exception() -> BaseException | None:
    """Last exception raised by a handler, if any.

    An exception from an async handler task takes precedence over one raised
    synchronously (which the C side recorded when it replied the default errno).
    """
    return _last_async_exc if _last_async_exc is not None else _require().last_exception()


def _wrap(handler: Callable[..., Any] | None, op: str):
    if handler is None:
        return None
    if not inspect.iscoroutinefunction(handler):
        return handler  # plain callable: must reply itself

    async def run(req, coro):
        global _last_async_exc
        try:
            result = await coro
        except OSError as exc:
            _last_async_exc = exc
            if not req.replied:
                req.reply_err(exc.errno or errno.EIO)
            return
        except BaseException as exc:  # includes Cancelled at shutdown
            _last_async_exc = exc
            if not req.replied:
                req.reply_err(errno.EIO)
            if not isinstance(exc, Exception):
                raise
            return
        if req.replied:
            return
        if op == "copy_file_range":
            if not isinstance(result, int) or result < 0:
                req.reply_err(errno.EIO)
            else:
                req.reply_write(result)
        else:
            req.reply_err(0 if result is None else int(result))

    def sync_entry(req, *args):
        import trio  # only async handlers need trio

        coro = handler(req, *args)
        try:
            trio.lowlevel.spawn_system_task(run, req, coro, name=f"extops.{op}")
        except BaseException:
            coro.close()
            raise  # C side replies the default errno
    sync_entry.__wrapped__ = handler
    return sync_entry


def set_handlers(copy_file_range: Callable[..., Any] | None = None,
                 fallocate: Callable[..., Any] | None = None) -> None:
    """Register (or clear with None) the Python handlers.

    ``copy_file_range(req, ino_in, fh_in, off_in, ino_out, fh_out, off_out, length, flags)``
    ``fallocate(req, ino, fh, mode, offset, length)``

    May be called before or after pyfuse3.init(); takes effect immediately.
    """
    _require().set_handlers(copy_file_range=_wrap(copy_file_range, "copy_file_range"),
                            fallocate=_wrap(fallocate, "fallocate"))


def set_read_handler(read: Callable[[int, int, int], Any] | None) -> None:
    """Serve reads with ``read(fh, off, size)`` (see "Reads and writes" above), or give them back to
    pyfuse3 (None)."""
    _require().set_read_handler(read)


def set_write_handler(write: Callable[[int, int, Any], Any] | None) -> None:
    """Serve writes with ``write(fh, off, data)`` (see "Reads and writes" above), or give them back to
    pyfuse3 (None)."""
    _require().set_write_handler(write)


def set_meta_handlers(lookup=None, getattr=None, unlink=None, forget=None,
                      entry_timeout: float = 1.0, attr_timeout: float = 1.0) -> None:
    """Serve lookup, getattr, unlink and forget synchronously (see "Reads and writes" above); a handler
    left None gives its requests back to pyfuse3."""
    _require().set_meta_handlers(lookup=lookup, getattr=getattr, unlink=unlink, forget=forget,
                                 entry_timeout=entry_timeout, attr_timeout=attr_timeout)


def set_file_handlers(open=None, create=None, release=None, direct_io: bool = False,
                      keep_cache: bool = False, no_flush: bool = False, tmpfile=None) -> None:
    """Serve open, create, tmpfile and release synchronously, and with no_flush answer FLUSH with ENOSYS
    (see "Reads and writes" above); a handler left None gives its requests back to pyfuse3 (tmpfile:
    ENOSYS)."""
    _require().set_file_handlers(open=open, create=create, release=release, direct_io=direct_io,
                                 keep_cache=keep_cache, no_flush=no_flush, tmpfile=tmpfile)


def set_dont_mask(flag: bool) -> None:
    """Ask the kernel for unmasked creation modes (FUSE_CAP_DONT_MASK, see above). Takes effect at the
    INIT request: call it after pyfuse3.init() and before pyfuse3.main()."""
    _require().set_dont_mask(flag)


def set_lseek_handler(lseek: Callable[[int, int, int], Any] | None) -> None:
    """Answer SEEK_DATA and SEEK_HOLE with ``lseek(fh, off, whence)`` (see "Reads and writes" above), or
    give them back to pyfuse3 (None), which answers ENOSYS."""
    _require().set_lseek_handler(lseek)


def set_dir_handlers(opendir=None, readdir=None, releasedir=None, looked_up=None) -> None:
    """Serve opendir, readdirplus and releasedir synchronously (see "Reads and writes" above); a handler
    left None gives its requests back to pyfuse3. A readdir handler needs looked_up."""
    _require().set_dir_handlers(opendir=opendir, readdir=readdir, releasedir=releasedir, looked_up=looked_up)


def set_chain_wait(wait_us: int) -> None:
    """How long, in microseconds, a chain waits for the next request (see "Reads and writes"); 0 turns
    chains off."""
    _require().set_chain_wait(wait_us)
