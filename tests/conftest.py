"""Shared fixtures: a fresh store, and volumes that are checked with fsck when the test ends.

fsck is the oracle: every test that drives the filesystem through `vol` or `open_volume` ends with the
checker run (data checksums included) on each volume still open, and again on the closed store. A test
that damages the store on purpose marks itself `@pytest.mark.damages_store` and makes its own assertions.
"""
from __future__ import annotations

import pytest

from reflinkfs.check import fsck, fsck_db
from reflinkfs.core.volume import Volume
from reflinkfs.meta.schema import mkfs


def pytest_configure(config):
    config.addinivalue_line("markers", "damages_store: the test corrupts the store; skip the fsck at teardown")


def fsck_findings(v: Volume, verify_data: bool = True) -> list[str]:
    """Commit an open volume and return what fsck finds in it (an empty list when clean)."""
    v.commit()
    return fsck_db(v.db, v.data.path, verify_data=verify_data).findings


@pytest.fixture
def store(tmp_path) -> str:
    path = str(tmp_path / "store")
    mkfs(path)
    return path


@pytest.fixture
def open_volume(request, store):
    """Open (and reopen) volumes on `store`; all are fsck-checked and closed at teardown."""
    opened: list[Volume] = []

    def _open(path: str = store, **kwargs) -> Volume:
        v = Volume.open(path, **kwargs)
        opened.append(v)
        return v

    yield _open
    check = request.node.get_closest_marker("damages_store") is None
    findings = []
    for v in opened:
        if v.db is not None:
            if check:
                findings += fsck_findings(v, verify_data=False)   # data is verified once, below
            v.close()
    if check:
        findings += fsck(store, verify_data=True).findings
        assert findings == [], "fsck findings at teardown"


@pytest.fixture
def vol(open_volume) -> Volume:
    return open_volume()


@pytest.fixture
def check_clean():
    """`check_clean(v)`: assert fsck finds nothing in an open volume (commits it first)."""
    def _check(v: Volume) -> None:
        assert fsck_findings(v) == []
    return _check
