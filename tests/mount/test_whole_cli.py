"""What a user sees of segments: `reflinkfs stat` (and --json) gives a file's segment and whether it is
whole; `reflinkfs df` counts whole files and bytes. Files are laid out in segments before mounting
(`_layout.place`: nothing allocates into segments other than 0 yet); cp --reflink=auto copies share them."""
from __future__ import annotations

import json
import os
import random
import subprocess

from _layout import place
from mountutil import run_cli
from reflinkfs.core.volume import Volume

BS = 4096


def stat_json(path) -> dict:
    r = run_cli("stat", "--json", path)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[str(path)]


def test_stat_and_df_show_whole_files(mounts):
    store = mounts.store()
    data = random.Random(3).randbytes(7 * BS + 33)
    v = Volume.open(str(store))
    a = v.create(1, b"a", 0o644, 0, 0).ino
    v.write(a, 0, data)
    z = v.create(1, b"z", 0o644, 0, 0).ino
    v.write(z, 0, data[:5000])
    v.close()
    place(str(store), {a: 1})
    m = mounts.mount(store)
    info = stat_json(m.path("a"))
    assert (info["segment"], info["whole"], info["not_whole_because"]) == (1, True, "")
    info = stat_json(m.path("z"))
    assert (info["segment"], info["whole"]) == (0, False)
    subprocess.run(["cp", "--reflink=auto", m.path("a"), m.path("b")], check=True)
    assert stat_json(m.path("b"))["whole"] is True and stat_json(m.path("b"))["segment"] == 1
    with open(m.path("b"), "rb") as f:
        assert f.read() == data
    text = run_cli("stat", m.path("b")).stdout
    assert "segment: 1, whole" in text
    r = run_cli("df", "--json", m.mnt)
    assert json.loads(r.stdout)["whole_files"] == 2
    assert json.loads(r.stdout)["whole_bytes"] == 2 * len(data)
    assert "whole files:     2" in run_cli("df", m.mnt).stdout
    with open(m.path("b"), "r+b") as f:              # one block of a sharer rewritten
        os.pwrite(f.fileno(), b"x" * BS, 3 * BS)
    info = stat_json(m.path("b"))
    assert info["whole"] is False and "not whole" in run_cli("stat", m.path("b")).stdout
    assert stat_json(m.path("a"))["whole"] is True
    os.truncate(m.path("a"), 2 * BS)                # truncation of the other sharer
    assert stat_json(m.path("a"))["whole"] is False
    assert json.loads(run_cli("df", "--json", m.mnt).stdout)["whole_files"] == 0
