"""Many small files: `tar -xf` of a tarball into a mount, then `cp -a --reflink=auto` of the tree on the
mount, for this tree (every file in a segment of its own, and files below --small-kib packed into
segment 0) against another checkout of reflinkfs (--before), interleaved in one run.

    sudo .venv/bin/python scripts/bench_small_files.py --before /path/to/older/checkout --rounds 3
    (the tarball defaults to this interpreter's standard library: tar -cf of it, without __pycache__)

Each variant makes its own store with its own code (mkfs, mount, tar, cp, umount). Prints each round and
the median per variant. Wall-clock times on a shared machine are noisy: compare medians of the same run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stdlib_tar(workdir: str) -> str:
    lib = sysconfig.get_paths()["stdlib"]
    out = os.path.join(workdir, "stdlib.tar")
    subprocess.run(["tar", "-cf", out, "--exclude=__pycache__", "--exclude=site-packages",
                    "--exclude=dist-packages", "-C", os.path.dirname(lib), os.path.basename(lib)], check=True)
    return out


def one(workdir: str, name: str, tree: str, small: str | None, tarball: str) -> tuple[float, float, int]:
    base = os.path.join(workdir, name)
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(os.path.join(base, "mnt"))
    store, mnt = os.path.join(base, "store"), os.path.join(base, "mnt")
    env = {k: v for k, v in os.environ.items() if k != "REFLINKFS_SMALL_FILE_BYTES"}
    env["PYTHONPATH"] = tree
    if small is not None:
        env["REFLINKFS_SMALL_FILE_BYTES"] = small
    cli = [sys.executable, "-m", "reflinkfs.cli"]
    # run from the variant's tree: `python -m` puts the working directory first on sys.path
    subprocess.run(cli + ["mkfs", store], env=env, cwd=tree, check=True, capture_output=True)
    subprocess.run(cli + ["mount", store, mnt], env=env, cwd=tree, check=True, capture_output=True)
    try:
        t = time.monotonic()
        subprocess.run(["tar", "-xf", tarball, "-C", mnt], check=True)
        t_tar = time.monotonic() - t
        top = os.listdir(mnt)[0]
        t = time.monotonic()
        subprocess.run(["cp", "-a", "--reflink=auto", os.path.join(mnt, top), os.path.join(mnt, "copy")], check=True)
        t_cp = time.monotonic() - t
    finally:
        subprocess.run(cli + ["umount", mnt], env=env, cwd=tree, check=True, capture_output=True)
    return t_tar, t_cp, len(os.listdir(os.path.join(store, "segs")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="another reflinkfs checkout (its code makes its own store)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--small-kib", type=int, default=64, help="threshold of the packed variant")
    p.add_argument("--tar", help="tarball to extract (default: the standard library)")
    p.add_argument("--workdir", help="where stores and mounts go (default: a new temporary directory)")
    a = p.parse_args(argv)
    workdir = a.workdir or tempfile.mkdtemp(prefix="reflinkfs-small-")
    tarball = a.tar or stdlib_tar(workdir)
    variants = {"before": (os.path.abspath(a.before), None), "own-segment": (HERE, "0"),
                f"packed<{a.small_kib}k": (HERE, str(a.small_kib << 10))}
    got: dict[str, list[tuple[float, float, int]]] = {k: [] for k in variants}
    for r in range(a.rounds):
        for name, (tree, small) in variants.items():
            got[name].append(one(workdir, name, tree, small, tarball))
            t_tar, t_cp, segs = got[name][-1]
            print(f"round {r}: {name:14} tar -xf {t_tar:6.2f} s   cp -a --reflink=auto {t_cp:6.2f} s   "
                  f"segments {segs}", flush=True)
    print("median:")
    for name, rows in got.items():
        print(f"  {name:14} tar -xf {statistics.median(x[0] for x in rows):6.2f} s   "
              f"cp -a --reflink=auto {statistics.median(x[1] for x in rows):6.2f} s")
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
