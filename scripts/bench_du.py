"""How long `reflinkfs du` takes on a tree of many files, against reading every file's extent map.

Builds a store of N files (default 100,000: 100 directories of N/100 files, 2 blocks each, every other
file a clone of its neighbour with one block rewritten) through the core directly (fast), mounts it, and
times `reflinkfs du` of the whole tree and of one directory, then a walk reading the user.reflinkfs.extents
attribute of every file (what a client without du would do).

    .venv/bin/python scripts/bench_du.py [--files 100000] [--dir /tmp/bench_du]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from reflinkfs.core.volume import Volume  # noqa: E402
from reflinkfs.meta.schema import ROOT_INO, mkfs  # noqa: E402

CLI = [sys.executable, "-m", "reflinkfs.cli"]


def build(store: str, nfiles: int) -> None:
    mkfs(store)
    v = Volume.open(store)
    try:
        per_dir = max(1, nfiles // 100)
        made = 0
        d = 0
        while made < nfiles:
            dino = v.mkdir(ROOT_INO, f"d{d:03}".encode(), 0o755, 0, 0).ino
            prev = None
            for i in range(min(per_dir, nfiles - made)):
                ino = v.create(dino, f"f{i:05}".encode(), 0o644, 0, 0).ino
                if prev is not None and i % 2:
                    v.clone_file(prev, ino)
                    v.write(ino, 0, os.urandom(4096))
                else:
                    v.write(ino, 0, os.urandom(8192))
                prev = ino
                made += 1
            d += 1
            v.commit()
    finally:
        v.close()


def timed(cmd) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode:
        sys.exit(r.stderr)
    print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dir", default="/tmp/bench_du")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    store, mnt = os.path.join(a.dir, "store"), os.path.join(a.dir, "mnt")
    os.mkdir(mnt)
    t = time.perf_counter()
    build(store, a.files)
    print(f"built {a.files} files in {time.perf_counter() - t:.1f} s")
    subprocess.run(CLI + ["mount", store, mnt], check=True)
    try:
        whole = timed(CLI + ["du", "--raw", mnt])
        one = timed(CLI + ["du", "--raw", os.path.join(mnt, "d000")])
        two = timed(CLI + ["du", "--raw", os.path.join(mnt, "d000"), os.path.join(mnt, "d001")])
        t = time.perf_counter()
        n = 0
        for dirpath, _, names in os.walk(mnt):
            for name in names:
                os.getxattr(os.path.join(dirpath, name), "user.reflinkfs.extents")
                n += 1
        walk = time.perf_counter() - t
        print(f"reflinkfs du of {a.files} files: {whole:.2f} s; of one directory of {a.files // 100}: "
              f"{one:.2f} s; of two directories as a set: {two:.2f} s (each a whole `reflinkfs du` process)")
        print(f"walk reading the extents attribute of each of {n} files: {walk:.2f} s")
    finally:
        subprocess.run(CLI + ["umount", mnt], check=True)


if __name__ == "__main__":
    main()
