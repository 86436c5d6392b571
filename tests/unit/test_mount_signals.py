"""The daemon's last commit, after its session has ended, survives the SIGTERM that systemd sends every
process left at shutdown (and a second Ctrl-C): fuse/mount.py runs it under `signals_ignored`."""
from __future__ import annotations

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import os, signal
    from reflinkfs.fuse.mount import signals_ignored
    before = signal.getsignal(signal.SIGINT)
    with signals_ignored():
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(os.getpid(), s)        # delivered before kill() returns
        print("committed", flush=True)
    assert signal.getsignal(signal.SIGINT) is before and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    print("handlers restored", flush=True)
""")


def test_last_commit_is_not_cut_short_by_signals():
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "committed\nhandlers restored\n"), r.stderr

