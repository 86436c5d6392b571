"""Fixtures for tests on a real mount: a fresh store mounted by the real `reflinkfs mount` command.

- `fs`: one mount per test module (mounting is fast, but not free). A module may set `MKFS_ARGS`,
  `MOUNT_OPTIONS` and `FOREGROUND` to choose how it is made. `workdir` is a fresh directory inside it
  for each test, so tests of one module do not see each other's files.
- `mounts`: a factory for tests that mount, unmount and remount themselves.

Every mount is unmounted at teardown, whatever happened: `reflinkfs umount`, and if that fails a lazy
unmount, then SIGTERM, then SIGKILL to the daemon. Then the daemon log must hold no traceback and no
"internal error", and `reflinkfs fsck --verify-data` must find the store clean.

Without /dev/fuse these tests skip, unless REFLINKFS_REQUIRE_FUSE=1, which makes them fail.
"""
from __future__ import annotations

import re

import pytest

from mountutil import Mount, MountFactory, is_mounted, mkfs, need_fuse


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="module")
def fs(request, tmp_path_factory):
    """A store mounted for the whole module; yields the `Mount` (.mnt, .store, .log(), .pid)."""
    need_fuse()
    base = tmp_path_factory.mktemp(re.sub(r"\W", "_", request.module.__name__.rsplit(".", 1)[-1]))
    store = base / "store"
    mkfs(store, *getattr(request.module, "MKFS_ARGS", ()))
    m = Mount(store, base / "mnt", foreground=getattr(request.module, "FOREGROUND", True),
              options=getattr(request.module, "MOUNT_OPTIONS", ()), watchdog=300).start()
    try:
        yield m
    finally:
        if is_mounted(m.mnt) or m.pid:
            m.unmount()
    m.check_after_unmount()


@pytest.fixture
def workdir(request, fs):
    """A fresh, empty directory inside the module's mount."""
    d = fs.path(re.sub(r"\W", "_", request.node.name)[:200])
    d.mkdir()
    return d


@pytest.fixture
def mounts(request, tmp_path):
    """`mounts.store()` makes a fresh store, `mounts.mount(store, **kw)` mounts it (a `Mount`)."""
    need_fuse()
    f = MountFactory(tmp_path)
    yield f
    rep = getattr(request.node, "rep_call", None)
    f.finish(failed=rep is None or rep.failed)


@pytest.fixture(scope="session")
def public_pythonpath():
    """A copy of the reflinkfs package that any user can import: tests that run commands as a second,
    unprivileged user need it, because the checkout may live in a directory only root can enter."""
    import shutil
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="reflinkfs-public-"))
    try:
        src = Path(__file__).resolve().parents[2] / "reflinkfs"
        shutil.copytree(src, d / "reflinkfs", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
        for path in [d, *d.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield str(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
