"""The FUSE request layer: one table of operations in C, each answered by one Python method.

Who owns what
-------------
pyfuse3 owns the session and the request loop: it mounts, its worker tasks on the trio loop receive
each request from /dev/fuse and hand it to libfuse, and it unmounts. The C extension
``reflinkfs.fuse._extops`` owns every request: libfuse calls the handler of *its* table of operations,
never pyfuse3's, and each handler calls the method of the same name of the object given to
:func:`serve` (``reflinkfs.fuse.adapter.Operations``) synchronously, in trio's thread:

* the method returns the reply's value, which is replied at once;
* the method raises, and ``ops.errno_of(op, exception)`` says which errno to answer: the one error
  boundary (an errno is never a return value);
* the method returns a coroutine, because it has to wait (a commit, room in the write queue, the
  kernel): the request is wrapped in a :class:`Request` and ``spawn(coroutine, request)`` runs the
  coroutine as a task, which answers with ``request.reply(value)`` or ``request.fail(exception)``.

The methods, their arguments and the shape of their values are listed in one place, the ``OPS`` table
at the top of ``_extops.c``; attributes are the tuple ``(ino, mode, nlink, uid, gid, rdev, size,
blksize, blocks, atime_ns, mtime_ns, ctime_ns)`` (blocks in 512-byte units). A request whose method
the object lacks is answered ENOSYS. FLUSH is never served: the kernel takes that ENOSYS to mean
close() has nothing to wait for and stops sending it.

Getting the table in
--------------------
pyfuse3 creates the session with libfuse's ``fuse_session_new()`` (in libfuse 3.17 an inline wrapper
around ``fuse_session_new_versioned@FUSE_3.17``). The C extension exports that symbol with that
version (``extops.map``); :func:`load` imports it with ``RTLD_GLOBAL``, so when pyfuse3's extension is
loaded afterwards, the dynamic linker binds pyfuse3's reference to ours, which replaces pyfuse3's table
and calls the real function. Symbol binding happens when pyfuse3's ``.so`` is loaded, so :func:`load`
must run before the first ``import pyfuse3`` in the process; it refuses (:class:`LoadOrderError`)
when pyfuse3 is already imported. After ``pyfuse3.init()``, :func:`interposed` tells whether the
session got the table; a mount refuses to go on without it.

The C side also relabels the newer copy request of Linux 6.18 (``FUSE_COPY_FILE_RANGE_64``) as the
older one, and serves requests in chains: after a request answered at once it waits up to
:func:`set_chain_wait` microseconds (default 100) for the next and serves it without a trip through
trio's loop; a deferred request ends the chain (its task needs the loop), and a chain holds the loop
for at most 256 requests or 2 ms. Writes: a big write's data arrives as a ``WriteData``, a read-only
buffer over libfuse's receive buffer (no copy); a method that keeps a reference takes that buffer over.
Reads: the method returns a list of buffers, replied as one iovec.

Passthrough: with ``serve(..., passthrough=True)`` INIT asks the kernel for FUSE passthrough;
:func:`negotiated` says whether it agreed (``passthrough``) or why not (``passthrough_unavailable``).
:func:`backing_open` registers a file the kernel may then read (and map) itself, :func:`backing_close`
ends the registration, and an ``open`` method that returns ``(fh, backing_id)`` instead of ``fh`` has
the open answered in passthrough to that file (never with direct_io or keep_cache). Which file and for
which open is ``reflinkfs.fuse.passthrough``'s decision.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

__all__ = ["LoadOrderError", "LoadStatus", "load", "serve", "set_chain_wait", "interposed", "negotiated",
           "backing_open", "backing_close", "counts", "last_exception"]

_ext = None  # the loaded reflinkfs.fuse._extops module


class LoadOrderError(RuntimeError):
    """pyfuse3 was imported before extops.load(); the table cannot get in."""


@dataclasses.dataclass(frozen=True)
class LoadStatus:
    loaded: bool          # the C extension is importable/imported
    effective: bool       # it was loaded before pyfuse3, so it will interpose
    reason: str = ""

    def __bool__(self) -> bool:
        return self.effective


_status = LoadStatus(False, False, "load() not called")


def load(strict: bool = True) -> LoadStatus:
    """Load the C extension into the global symbol scope; before the first ``import pyfuse3``.

    Idempotent. With ``strict=True`` (default) raises :class:`LoadOrderError` if pyfuse3 was imported
    first, and ``ImportError`` if the extension is missing; with ``strict=False`` returns a falsy
    :class:`LoadStatus` instead."""
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
        from . import _extops  # type: ignore[attr-defined]  # a C extension: mypy sees no module
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


def serve(ops: Any, spawn: Callable[[Any, Any], Any], *, direct_io: bool = True, keep_cache: bool = False,
          entry_timeout: float = 1.0, attr_timeout: float = 1.0, acl: bool = False,
          passthrough: bool = False) -> None:
    """Answer every request of the session ``pyfuse3.init()`` creates next with ``ops``' methods.

    ``ops`` also has ``errno_of(op, exception) -> errno`` and ``looked_up(ino)`` (an entry a READDIRPLUS
    reply carried, which the kernel counts as a lookup). ``spawn(coroutine, request)`` runs a deferred
    method's coroutine and answers through the :class:`Request`. Open and create replies carry
    ``direct_io`` and ``keep_cache``; entries and attributes carry the timeouts; ``acl`` asks the
    kernel for POSIX ACLs; ``passthrough`` asks it for FUSE passthrough."""
    _require().serve(ops, spawn, direct_io=direct_io, keep_cache=keep_cache, entry_timeout=entry_timeout,
                     attr_timeout=attr_timeout, acl=acl, passthrough=passthrough)


def set_chain_wait(wait_us: int) -> None:
    """How long, in microseconds, a chain waits for the next request; 0 turns chains off."""
    _require().set_chain_wait(wait_us)


def interposed() -> bool:
    """True once a session was created with the table of :func:`serve`."""
    return _ext is not None and _ext.interposed()


def negotiated() -> dict | None:
    """What INIT agreed with the kernel: ``{'libfuse': version, 'protocol': (major, minor),
    'direct_io_allow_mmap': bool, 'posix_acl': bool, 'dont_mask': bool, 'passthrough': bool,
    'passthrough_unavailable': why not ('' when agreed)}``, or None before INIT."""
    return _require().negotiated()


def backing_open(fd: int) -> int:
    """Register open file ``fd`` as a backing file of the session; returns its id (> 0). The kernel
    keeps its own reference, so ``fd`` may be closed afterwards. OSError when the kernel refuses (EPERM:
    no CAP_SYS_ADMIN; ELOOP: the file is on a stacked filesystem)."""
    return _require().backing_open(fd)


def backing_close(backing_id: int) -> None:
    """End a registration. Files the kernel opened through it keep reading it until they close."""
    _require().backing_close(backing_id)


def counts() -> dict:
    """``{'ops': {name: {'requests', 'deferred', 'failed'}}`` for each operation served so far, and the
    layer's own counts: ``chained`` (requests received by a chain), ``write_kept`` (receive buffers a
    write's data took over), ``copy_file_range_64`` (copy requests relabelled), ``bad_values`` (values
    that could not be replied, answered EIO), ``dropped`` (deferred requests never answered: EIO) and
    ``passthrough_opens`` (opens answered in passthrough)."""
    return _require().counts()


def last_exception() -> BaseException | None:
    """The last exception a method raised (or a value it returned that could not be replied)."""
    return _require().last_exception()
