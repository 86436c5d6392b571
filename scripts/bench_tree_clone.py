"""How long `reflinkfs clone -r` of whole trees takes, against `cp -a --reflink=auto` in the mount and XFS
`cp -a --reflink=always` on a loop device, and the longest stall a concurrent stat loop sees.

    python scripts/bench_tree_clone.py [--tree /usr/lib/python3.11] [--files 100000,1000000] [--dir DIR]

A benchmark, not a test. Trees: the --tree directory (the standard library), 10 copies of it, and
--files generated small files (100 per directory, written through the core into the unmounted store). Each command is timed from outside, start-up
included: `reflinkfs` is the command installed beside this Python (else `python -m reflinkfs.cli`), run
with bytecode caching allowed, as an installed package runs. While each `reflinkfs clone -r` runs, a
thread stats a name that does not exist in a directory of the mount in a loop (every such stat is a
LOOKUP the daemon must answer: the kernel caches no failed lookup) and the longest single stat is
reported ("stall"); the same loop run as long with no clone running gives the machine's own figure
("idle"). A second loop does the same in DST's parent (the request is answered as soon as the clone
starts, so the kernel does not hold that directory locked while it runs). XFS is set up on a loop device when mkfs.xfs exists and
the machine lets us mount it (root); otherwise the row says why not. Everything is unmounted and
removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_INSTALLED = Path(sys.executable).with_name("reflinkfs")
CLI = [str(_INSTALLED)] if _INSTALLED.exists() else [sys.executable, "-m", "reflinkfs.cli"]


def sh(*argv, check=True, **kw):
    return subprocess.run([str(a) for a in argv], check=check, capture_output=True, text=True, **kw)


def timed(*argv) -> float:
    return timed_out(*argv)[0]


def timed_out(*argv) -> tuple[float, str]:
    t = time.perf_counter()
    r = sh(*argv, check=False)
    if r.returncode:
        raise SystemExit(f"{' '.join(map(str, argv))} failed: {r.stderr.strip()}")
    return time.perf_counter() - t, r.stdout


class StatLoop:
    """stat() one path in a loop in a thread; the longest one is the stall the mount showed. A path that
    does not exist is looked up by the daemon every time."""
    def __init__(self, path: Path):
        self.path, self.worst, self.count = path, 0.0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t = time.perf_counter()
            try:
                os.stat(self.path)
            except FileNotFoundError:
                pass
            self.worst = max(self.worst, time.perf_counter() - t)
            self.count += 1

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def count_entries(root: Path) -> int:
    return sum(len(d) + len(f) for _, d, f in os.walk(root))


def generate(store: Path, files: int, name: str) -> None:
    """--files small files, 100 per directory, written into the closed store through the core (making a
    million through FUSE would take most of an hour); their blocks go to segment 0, which changes nothing
    for a clone (it copies extent records and adds references, wherever the blocks are)."""
    sys.path.insert(0, str(REPO))
    from reflinkfs.core.volume import Volume
    v = Volume.open(str(store))
    v.small_file_bytes = 1 << 62
    gen = v.mkdir(1, name.encode(), 0o755, 0, 0).ino
    for d in range(files // 100):
        sub = v.mkdir(gen, b"d%05d" % d, 0o755, 0, 0).ino
        for i in range(100):
            ino = v.create(sub, b"f%02d" % i, 0o644, 0, 0).ino
            if i:
                v.write(ino, 0, b"x" * (i * 13))
        if d % 100 == 99:
            v.commit()
    v.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")
    ap.add_argument("--files", default="100000,1000000",
                    help="comma-separated sizes of the generated trees (default 100000,1000000)")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    try:
        counts = [int(x) for x in args.files.split(",")]
    except ValueError:
        ap.error(f"--files {args.files!r}: give numbers of files, comma-separated")
    os.environ["PYTHONPATH"] = str(REPO)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)    # an installed package has its bytecode cached
    base = Path(tempfile.mkdtemp(prefix="bench-tree-", dir=args.dir))
    store, mnt = base / "store", base / "mnt"
    mnt.mkdir()
    rows = []
    mounted = xfs_mounted = False
    loop = None
    try:
        sh(*CLI, "mkfs", store)
        sh(*CLI, "mount", store, mnt)
        mounted = True
        one = mnt / "one"
        sh("cp", "-a", args.tree, one)
        ten = mnt / "ten"
        ten.mkdir()
        for i in range(10):
            sh(*CLI, "clone", "-r", one, ten / f"c{i}")
        sh(*CLI, "umount", mnt)          # start from a committed store, as after a normal day
        gens = []
        for n in counts:
            generate(store, n, f"gen{n}")
            gens.append((f"{n} files", mnt / f"gen{n}"))
        sh(*CLI, "mount", store, mnt)
        probe = mnt / "one" / "no-such-name"           # not DST's parent: see the module notes
        in_parent = mnt / "no-such-name"                # DST's parent (DST is mnt/rc-...)
        for label, tree in [("stdlib", one), ("10x stdlib", ten), *gens]:
            n = count_entries(tree)
            with StatLoop(probe) as s, StatLoop(in_parent) as p:
                t, out = timed_out(*CLI, "clone", "-r", "--json", tree, mnt / f"rc-{tree.name}")
            with StatLoop(probe) as idle:
                time.sleep(t)
            step = json.loads(out)["longest_step_ms"]
            rows.append((label, n, "reflinkfs clone -r", t,
                         f"{s.worst * 1000:.1f} ms (idle {idle.worst * 1000:.1f} ms; in DST's parent "
                         f"{p.worst * 1000:.0f} ms; longest daemon step {step:.1f} ms)"))
            if tree in (one, ten):
                rows.append((label, n, "reflinkfs cp -a --reflink=auto", timed("cp", "-a", "--reflink=auto", tree,
                                                                              mnt / f"cp-{tree.name}"), ""))
        # XFS on a loop device
        xfs_note = ""
        if shutil.which("mkfs.xfs") is None:
            xfs_note = "mkfs.xfs not installed"
        else:
            img, xmnt = base / "xfs.img", base / "xfs"
            xmnt.mkdir()
            with open(img, "wb") as f:
                f.truncate(4 << 30)
            try:
                sh("mkfs.xfs", "-q", "-m", "reflink=1", img)
                loop = sh("losetup", "--find", "--show", img).stdout.strip()
                sh("mount", loop, xmnt)
                xfs_mounted = True
                sh("cp", "-a", args.tree, xmnt / "one")
                (xmnt / "ten").mkdir()
                for i in range(10):
                    sh("cp", "-a", "--reflink=always", xmnt / "one", xmnt / "ten" / f"c{i}")
                for label, name in (("stdlib", "one"), ("10x stdlib", "ten")):
                    sh("sync")
                    t = timed("cp", "-a", "--reflink=always", xmnt / name, xmnt / f"rc-{name}")
                    rows.append((label, count_entries(xmnt / name), "XFS cp -a --reflink=always", t, ""))
            except subprocess.CalledProcessError as e:
                xfs_note = f"XFS not measured: {' '.join(map(str, e.cmd))}: {e.stderr.strip()}"
        print(f"{'tree':<16} {'entries':>8}  {'command':<32} {'seconds':>8}  stall (longest stat)")
        for label, n, cmd, t, stall in rows:
            print(f"{label:<16} {n:>8}  {cmd:<32} {t:>8.2f}  {stall}")
        if xfs_note:
            print(xfs_note)
    finally:
        if xfs_mounted:
            sh("umount", base / "xfs", check=False)
        if loop:
            sh("losetup", "-d", loop, check=False)
        if mounted:
            sh(*CLI, "umount", mnt, check=False)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
