"""The mkfs and fsck commands: exit codes, and one-line errors without a traceback."""
import os
import sqlite3

from reflinkfs.cli import main
from reflinkfs.core.volume import Volume
from reflinkfs.meta.schema import DB_NAME


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    return err


def test_mkfs_then_fsck_clean(tmp_path, capsys):
    store = str(tmp_path / "s")
    assert main(["mkfs", store, "--size", "1M"]) == 0
    assert "created store" in capsys.readouterr().out
    assert main(["fsck", store]) == 0
    assert "clean" in capsys.readouterr().err
    assert main(["fsck", "--verify-data", store]) == 0


def test_mkfs_twice_fails_with_one_line(tmp_path, capsys):
    store = str(tmp_path / "s")
    assert main(["mkfs", store]) == 0
    capsys.readouterr()
    assert main(["mkfs", store]) == 1
    assert _err_line(capsys).startswith("reflinkfs mkfs: ")


def test_mkfs_bad_size(tmp_path, capsys):
    assert main(["mkfs", str(tmp_path / "s"), "--size", "1k"]) == 1
    assert "too small" in _err_line(capsys)
    try:
        rc = main(["mkfs", str(tmp_path / "t"), "--size", "lots"])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert "not a size" in _err_line(capsys)


def test_fsck_missing_store(tmp_path, capsys):
    assert main(["fsck", str(tmp_path / "nope")]) == 1
    assert _err_line(capsys).startswith("reflinkfs fsck: ")


def test_fsck_damaged_db(tmp_path, capsys):
    store = str(tmp_path / "s")
    main(["mkfs", store])
    with open(os.path.join(store, DB_NAME), "wb") as f:
        f.write(b"\xff" * 4096)
    capsys.readouterr()
    assert main(["fsck", store]) == 1
    assert "damaged" in _err_line(capsys)


def test_fsck_store_in_use(tmp_path, capsys):
    store = str(tmp_path / "s")
    main(["mkfs", store])
    capsys.readouterr()
    v = Volume.open(store)
    try:
        assert main(["fsck", store]) == 1
        assert "in use" in _err_line(capsys)
    finally:
        v.close()


def test_fsck_finding_exit_codes_and_repair(tmp_path, capsys):
    store = str(tmp_path / "s")
    main(["mkfs", store])
    v = Volume.open(store)
    ino = v.create(1, b"f", 0o644, 0, 0).ino
    v.write(ino, 0, b"a" * 8192)
    v.close()
    db = sqlite3.connect(os.path.join(store, DB_NAME))
    db.execute("UPDATE refs SET refcount = refcount + 1")
    db.commit()
    db.close()
    capsys.readouterr()
    assert main(["fsck", store]) == 1
    out = capsys.readouterr().out
    assert "refcount 2, but 1 extent(s) use them" in out
    assert main(["fsck", "--repair", store]) == 0
    assert "repaired: rebuilt refcounts" in capsys.readouterr().out
    assert main(["fsck", store]) == 0
