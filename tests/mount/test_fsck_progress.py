"""`fsck --verify-data` shows a progress bar on a terminal, and nothing extra when stderr is not one."""
from __future__ import annotations

import os
import pty
import subprocess

from mountutil import cli_cmd, mounted, run_cli


def run_on_tty(*args) -> tuple[int, str]:
    """Run the CLI with stderr (and stdout) on a pseudo-terminal; return its exit code and output."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(cli_cmd(*args), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:          # EIO: the child's end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode(errors="replace")


def test_fsck_progress(mounts):
    store = mounts.store()
    with mounted(store, store.parent / "mnt") as m:
        m.path("f").write_bytes(os.urandom(3 << 20))
    rc, out = run_on_tty("fsck", "--verify-data", store)
    assert rc == 0, out
    assert "verifying data [" in out and "100%" in out and "3.0 MiB of 3.0 MiB" in out, out
    assert out.rstrip().endswith(f"{store}: clean"), out
    r = run_cli("fsck", "--verify-data", store)           # not a terminal: exactly what it printed before
    assert (r.returncode, r.stdout, r.stderr) == (0, "", f"{store}: clean\n")
    rc, out = run_on_tty("fsck", store)                    # no --verify-data: no bar
    assert rc == 0 and "verifying" not in out, out
