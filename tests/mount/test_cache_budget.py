"""The cache budget on a real mount with default options: chosen from the machine's memory, and shown by
`reflinkfs status` (text and --json) with what is held and the last shrink."""
from __future__ import annotations

import json
import os

from mountutil import run_cli
from reflinkfs.core import budget

FOREGROUND = False


def test_default_budget_follows_the_machine_and_status_shows_it(fs):
    r = run_cli("status", "--json", fs.mnt)
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)["cache"]
    mem = budget.read_memory()
    assert c["budget_bytes"] == budget.default_budget(mem) // c["unit_bytes"] * c["unit_bytes"]
    assert c["budget_source"].startswith("auto: a quarter of") and c["shrinks"] == 0 and c["last_shrink"] is None
    (fs.path("f")).write_bytes(os.urandom(1 << 20))
    with open(fs.path("f"), "r+b") as f:     # the daemon path (a read-only open would be passed through)
        assert f.read()
    r = run_cli("status", fs.mnt)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    budget_line = next(x for x in lines if x.strip().startswith("budget:"))
    assert f"{c['budget_bytes']} bytes, auto: a quarter of" in budget_line and "held: " in budget_line
    assert int(budget_line.rsplit("held: ", 1)[1].split()[0]) > 0
    assert any(x.strip() == "last shrink: never" for x in lines)
