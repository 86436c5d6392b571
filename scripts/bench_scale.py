"""Scale targets: a store with many files and extents must mount fast, stay small and clone fast.

    python scripts/bench_scale.py [--files 100000] [--extents 1000000] [--big-extents 100000] [--out DIR]

Builds a store directly (bulk SQL into the schema of `reflinkfs.meta.schema`, which is what writing the
files through `Volume` would leave behind, minus hours of Python) and checks it with `reflinkfs.check.fsck`
before measuring anything:
  - `--files` regular files in directories of 1000 (plus the root), `--extents` extents in all;
  - one file, `big`, with `--big-extents` extents: every other logical block mapped (as writing every
    other block leaves it), physically contiguous;
  - the other files have ~9 extents each, logically contiguous but physically interleaved with the other
    files' blocks (as concurrent writers leave them); every second file is a reflinked copy of the one
    before it (refcount 2), as a reflinked copy of a tree leaves them;
  - the data file is sparse: every block is zeros and every checksum is that of a zero block, so every
    read verifies.

Then it measures, against the targets of the issue:
  mount_s           wall time of `reflinkfs mount STORE MNT` (the background daemon; it returns once the
                    mount is ready), with the kernel's caches dropped first (cold) and not (warm)   < 2 s
  bytes_per_extent  daemon RSS minus the RSS of a daemon on an empty store, divided by the extents, right
                    after mount and after stat-ing every file (os.lstat through the mount)          < 300
  clone_s           `cp --reflink=auto big big.copy`, `cp --reflink=auto --sparse=never` (GNU cp 9.1
                    copies a sparse source region by region, finding the regions with SEEK_DATA and
                    SEEK_HOLE: with read/write, or with --sparse=never one copy_file_range per data region
                    and zeros written into the holes; big has a hole every other block, so both take two
                    round trips per region; the mount's clone and data-file counters show what happened),
                    then `reflinkfs clone big big.clone`, which shares the whole file at once        < 1 s
and prints each number with pass/fail, and writes results.json to --out (default scripts/out/scale/).
Everything mounted is unmounted at the end, on error and on Ctrl-C/SIGTERM too.

`--keep` keeps the work directory, with the store as built in WORK/pristine (and WORK/counts.json);
`--store WORK/pristine` measures a copy of it instead of building again; `--mount-cli "python launcher.py"` runs the daemon through a launcher that
patches the code, to A/B a change on the same store.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import xxhash  # noqa: E402

from reflinkfs.check import fsck  # noqa: E402
from reflinkfs.mounts import is_mounted  # noqa: E402
from reflinkfs.meta import schema  # noqa: E402

PY = sys.executable
BS = schema.BLOCK_SIZE
MiB = 1 << 20
PER_DIR = 1000
GOALS = {"mount_s": 2.0, "bytes_per_extent": 300.0, "clone_s": 1.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


MOUNT_CLI = [PY, "-m", "reflinkfs.cli"]       # --mount-cli replaces it for the daemon (A/B runs)


def cli(*args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
    base = MOUNT_CLI if args and args[0] == "mount" else [PY, "-m", "reflinkfs.cli"]
    r = subprocess.run([*base, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"reflinkfs {' '.join(args)} failed: {(r.stderr or r.stdout).strip()[-400:]}")
    return r


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def daemon_pid(store: str) -> int:
    """The daemon serving `store`: the process that holds the store's lock (from /proc/locks)."""
    lock_ino = os.stat(os.path.join(store, schema.LOCK_NAME)).st_ino
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            # 1: FLOCK  ADVISORY  WRITE 1234 fd:00:5678 0 EOF
            if len(parts) >= 6 and parts[1] == "FLOCK":
                dev_ino = parts[5].split(":")
                if int(dev_ino[-1]) == lock_ino:
                    return int(parts[4])
    raise RuntimeError(f"no process holds the lock of {store}")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RSS for pid {pid}")


# -- building the store --------------------------------------------------------------------------
def build(store: str, nfiles: int, nextents: int, big_extents: int) -> dict:
    """Fill a fresh store with nfiles files and nextents extents; return counts."""
    assert nfiles >= 2 and nextents >= big_extents + (nfiles - 1)
    schema.mkfs(store)
    db = schema.open_store_db(store)
    db.execute("PRAGMA synchronous=OFF")
    now = time.time_ns()
    uid, gid = os.getuid(), os.getgid()
    nsmall = nfiles - 1
    ndirs = -(-nsmall // PER_DIR)

    inodes, dirents, extents = [], [], []
    ino = schema.ROOT_INO + 1
    dir_inos = []
    for d in range(ndirs):
        inodes.append((ino, stat.S_IFDIR | 0o755, uid, gid, 2, 0, 0, now))
        dirents.append((schema.ROOT_INO, f"d{d:04d}".encode(), ino))
        dir_inos.append(ino)
        ino += 1

    # the big file: logical blocks 0, 2, 4, ... -> physical blocks 0, 1, 2, ... (one refcount-1 run)
    big_ino = ino
    ino += 1
    for i in range(big_extents):
        extents.append((big_ino, 2 * i, i, 1))
    big_size = (2 * big_extents - 1) * BS
    inodes.append((big_ino, stat.S_IFREG | 0o644, uid, gid, 1, big_size, big_extents, now))
    dirents.append((schema.ROOT_INO, b"big", big_ino))
    next_pblock = big_extents

    # small files: originals (even) own interleaved blocks; each odd one is a reflinked copy of the one
    # before it. Extent i of the o-th original lives at base + i * n_orig + o.
    k = (nextents - big_extents) // nsmall
    n_orig = (nsmall + 1) // 2
    base = next_pblock
    next_pblock += k * n_orig
    refcount = bytearray(next_pblock)          # per physical block; all < 256 here
    for p in range(big_extents):
        refcount[p] = 1
    small_inos = []
    for j in range(nsmall):
        o = j // 2
        f_ino = ino
        ino += 1
        small_inos.append(f_ino)
        for i in range(k):
            pb = base + i * n_orig + o
            extents.append((f_ino, i, pb, 1))
            refcount[pb] += 1
        inodes.append((f_ino, stat.S_IFREG | 0o644, uid, gid, 1, k * BS, k, now))
        dirents.append((dir_inos[j // PER_DIR], f"f{j % PER_DIR:04d}".encode(), f_ino))
    # the remainder: extra extents of the last small file, one block each, with a hole before each
    extra = nextents - big_extents - k * nsmall
    if extra:
        last = small_inos[-1]
        blocks = k
        for i in range(extra):
            extents.append((last, k + 1 + 2 * i, next_pblock, 1))
            refcount.append(1)
            next_pblock += 1
            blocks += 1
        size = (k + 1 + 2 * (extra - 1) + 1) * BS
        row = inodes.pop()
        assert row[0] == last
        inodes.append((last, row[1], uid, gid, 1, size, blocks, now))
    data_blocks = next_pblock

    # refcount runs: maximal runs of equal refcount (what incref/decref leave behind, give or take splits)
    refs = []
    start = 0
    for p in range(1, data_blocks + 1):
        if p == data_blocks or refcount[p] != refcount[start]:
            refs.append((start, p - start, refcount[start]))
            start = p
    zero_sum = xxhash.xxh3_64_intdigest(bytes(BS))
    run = 1024                             # blocks per checksum row

    db.execute("BEGIN")
    db.executemany("INSERT INTO inodes(ino, mode, uid, gid, nlink, size, blocks, atime_ns, mtime_ns, ctime_ns) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", ((*r[:7], r[7], r[7], r[7]) for r in inodes))
    db.execute("UPDATE inodes SET nlink = nlink + ? WHERE ino = ?", (ndirs, schema.ROOT_INO))
    db.executemany("INSERT INTO dirents(parent, name, ino) VALUES (?, ?, ?)", dirents)
    db.executemany("INSERT INTO extents(ino, lblock, pblock, nblocks) VALUES (?, ?, ?, ?)", sorted(extents))
    db.executemany("INSERT INTO refs(pblock, nblocks, refcount) VALUES (?, ?, ?)", refs)
    db.executemany("INSERT INTO csums(pblock, nblocks, sums) VALUES (?, ?, ?)",
                   ((p, min(run, data_blocks - p), schema.pack_sums([zero_sum] * min(run, data_blocks - p)))
                    for p in range(0, data_blocks, run)))
    schema.set_meta(db, "data_blocks", data_blocks)
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    with open(os.path.join(store, schema.DATA_NAME), "r+b") as f:
        f.truncate(data_blocks * BS)       # sparse: every block reads as zeros
    return {"files": nfiles, "dirs": ndirs, "extents": len(extents), "big_extents": big_extents,
            "refs_runs": len(refs), "data_blocks": data_blocks,
            "meta_db_bytes": os.path.getsize(os.path.join(store, schema.DB_NAME))}


# -- measuring -----------------------------------------------------------------------------------
class Mounts:
    """Every mount this script made, so that all of them are undone whatever happens."""

    def __init__(self):
        self.live: list[str] = []

    def mount(self, store: str, mnt: str, *extra: str) -> float:
        t0 = time.perf_counter()
        cli("mount", store, mnt, *extra)
        dt = time.perf_counter() - t0
        self.live.append(mnt)
        return dt

    def umount(self, mnt: str) -> None:
        if mnt in self.live:
            self.live.remove(mnt)
        if not is_mounted(mnt):
            return
        r = cli("umount", mnt, check=False)
        if r.returncode != 0:
            log(f"umount {mnt} failed ({r.stderr.strip()}); lazy unmount")
            subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)

    def umount_all(self) -> None:
        for mnt in list(self.live):
            self.umount(mnt)


def status(mnt: str) -> dict:
    return json.loads(os.getxattr(mnt, "user.reflinkfs.status"))


def stat_all(mnt: str) -> int:
    n = 0
    for dirpath, dirnames, filenames in os.walk(mnt):
        for name in filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def measure(args, work: str, store: str, counts: dict, mounts: Mounts) -> dict:
    res: dict = {}
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)

    # baseline: a daemon on an empty store, to subtract what any daemon costs
    empty = os.path.join(work, "empty-store")
    cli("mkfs", empty)
    mounts.mount(empty, mnt)
    time.sleep(0.5)
    rss_empty = rss(daemon_pid(empty))
    mounts.umount(mnt)
    res["rss_empty_store_mib"] = rss_empty / MiB

    # mount time: cold (kernel caches dropped, so meta.db comes from disk) and warm, a few times each
    cold, warm = [], []
    for _ in range(args.mount_repeat):
        drop_caches()
        cold.append(mounts.mount(store, mnt))
        mounts.umount(mnt)
        warm.append(mounts.mount(store, mnt))
        if _ < args.mount_repeat - 1:
            mounts.umount(mnt)
    res["mount_cold_s"] = cold
    res["mount_warm_s"] = warm
    log(f"mount: cold {', '.join(f'{x:.3f}' for x in cold)} s; warm {', '.join(f'{x:.3f}' for x in warm)} s")

    # memory: right after mount, after stat-ing every file
    pid = daemon_pid(store)
    time.sleep(0.5)
    r_mount = rss(pid)
    t0 = time.perf_counter()
    n = stat_all(mnt)
    res["stat_all_s"] = time.perf_counter() - t0
    res["stat_all_files"] = n
    r_stat = rss(pid)
    ext = counts["extents"]
    res["rss_after_mount_mib"] = r_mount / MiB
    res["rss_after_stat_mib"] = r_stat / MiB
    res["bytes_per_extent_after_mount"] = (r_mount - rss_empty) / ext
    res["bytes_per_extent_after_stat"] = (r_stat - rss_empty) / ext
    log(f"stat of {n} files: {res['stat_all_s']:.1f} s; RSS {r_mount / MiB:.1f} MiB after mount, "
        f"{r_stat / MiB:.1f} MiB after stat (empty store: {rss_empty / MiB:.1f} MiB)")

    # clone of the big file. GNU cp 9.1 (Debian 12) sees a sparse source (st_blocks < size) and copies it
    # region by region (SEEK_DATA/SEEK_HOLE) with read/write instead of copy_file_range; --sparse=never
    # makes it call copy_file_range for each data region and write zeros into the holes. Both are
    # measured, with the mount's clone counter and data-file write counter telling what happened.
    big = os.path.join(mnt, "big")
    for key, extra in (("clone_cp_s", []), ("clone_cp_sparse_never_s", ["--sparse=never"])):
        before = status(mnt)
        t0 = time.perf_counter()
        dst = os.path.join(mnt, "big.copy" + ("" if not extra else ".never"))
        subprocess.run(["cp", "--reflink=auto", *extra, big, dst], check=True, timeout=3600)
        res[key] = time.perf_counter() - t0
        after = status(mnt)
        res[key.replace("_s", "_requests")] = after["clones"] - before["clones"]
        res[key.replace("_s", "_data_bytes_written")] = (after["data_file"]["bytes_written"]
                                                         - before["data_file"]["bytes_written"])
        res[key.replace("_s", "_data_bytes_read")] = (after["data_file"]["bytes_read"]
                                                      - before["data_file"]["bytes_read"])
        log(f"cp --reflink=auto {' '.join(extra)} of big ({counts['big_extents']} extents): {res[key]:.3f} s, "
            f"{res[key.replace('_s', '_requests')]} clone request(s), "
            f"{res[key.replace('_s', '_data_bytes_read')]} data bytes read, "
            f"{res[key.replace('_s', '_data_bytes_written')]} written")
    t0 = time.perf_counter()
    cli("clone", big, os.path.join(mnt, "big.clone"), timeout=3600)
    res["clone_cli_s"] = time.perf_counter() - t0
    log(f"reflinkfs clone of big: {res['clone_cli_s']:.3f} s")
    res["rss_after_clone_mib"] = rss(pid) / MiB
    t0 = time.perf_counter()
    mounts.umount(mnt)
    res["umount_s"] = time.perf_counter() - t0
    return res


def verdicts(res: dict) -> list[tuple[str, float, float, bool]]:
    rows = [("mount, cold caches (s, worst)", max(res["mount_cold_s"]), GOALS["mount_s"]),
            ("mount, warm caches (s, worst)", max(res["mount_warm_s"]), GOALS["mount_s"]),
            ("daemon bytes/extent after mount", res["bytes_per_extent_after_mount"], GOALS["bytes_per_extent"]),
            ("daemon bytes/extent after stat of all", res["bytes_per_extent_after_stat"], GOALS["bytes_per_extent"]),
            ("cp --reflink=auto of big (s)", res["clone_cp_s"], GOALS["clone_s"]),
            ("cp --reflink=auto --sparse=never of big (s)", res["clone_cp_sparse_never_s"], GOALS["clone_s"]),
            ("reflinkfs clone of big (s)", res["clone_cli_s"], GOALS["clone_s"])]
    return [(name, v, g, v < g) for name, v, g in rows]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--extents", type=int, default=1_000_000)
    p.add_argument("--big-extents", type=int, default=100_000)
    p.add_argument("--mount-repeat", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where the store goes (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the built store (its path is printed)")
    p.add_argument("--skip-fsck", action="store_true", help="do not check the built store (faster)")
    p.add_argument("--out", default=os.path.join(HERE, "out", "scale"))
    p.add_argument("--store", help="measure this store (built by an earlier --keep run; it is copied first, "
                                   "so the measurement never changes it) instead of building one")
    p.add_argument("--mount-cli", default="", help="command that replaces 'python -m reflinkfs.cli' for "
                                                   "`mount` (a launcher that patches the code, for A/B runs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("bench_scale: must run as root (it mounts and drops caches)", file=sys.stderr)
        return 1

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    if args.mount_cli:
        import shlex
        MOUNT_CLI[:] = shlex.split(args.mount_cli)
    work = tempfile.mkdtemp(prefix="reflinkfs-scale-", dir=args.workdir)
    store = os.path.join(work, "store")
    mounts = Mounts()
    res: dict = {"args": vars(args)}
    code = 0
    try:
        t0 = time.perf_counter()
        if args.store:
            subprocess.run(["cp", "-a", "--sparse=always", args.store, store], check=True)
            with open(os.path.join(os.path.dirname(os.path.abspath(args.store)), "counts.json")) as f:
                counts = json.load(f)
            res["copied_from"] = args.store
        else:
            counts = build(store, args.files, args.extents, args.big_extents)
            with open(os.path.join(work, "counts.json"), "w") as f:
                json.dump(counts, f)
        res["build_s"] = time.perf_counter() - t0
        res["store"] = counts
        log(f"built {store}: {counts} in {res['build_s']:.1f} s")
        if not args.skip_fsck:
            t0 = time.perf_counter()
            rep = fsck(store)
            res["fsck_s"] = time.perf_counter() - t0
            log(f"fsck: {'clean' if rep.clean else 'NOT CLEAN'} in {res['fsck_s']:.1f} s")
            if not rep.clean:
                for f in rep.findings[:20]:
                    log(f"  {f}")
                raise RuntimeError("the built store does not pass fsck")
        if args.keep and not args.store:
            # measuring changes the store (clones): keep the store as built, for later --store runs
            subprocess.run(["cp", "-a", "--sparse=always", store, os.path.join(work, "pristine")], check=True)
        res.update(measure(args, work, store, counts, mounts))
    except KeyboardInterrupt:
        log("interrupted: unmounting")
        code = 130
    except Exception as e:
        log(f"failed: {e}")
        code = 1
    finally:
        mounts.umount_all()
        if args.keep:
            log(f"kept {work} (measure the store as built again with --store {os.path.join(work, 'pristine')})")
        elif not is_mounted(os.path.join(work, "mnt")):
            shutil.rmtree(work, ignore_errors=True)
    if "clone_cli_s" not in res:
        return code or 1
    os.makedirs(args.out, exist_ok=True)
    rows = verdicts(res)
    res["verdicts"] = [{"what": n, "value": v, "goal": g, "pass": ok} for n, v, g, ok in rows]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nstore: {res['store']['files']} files, {res['store']['extents']} extents "
          f"(big: {res['store']['big_extents']}), {res['store']['refs_runs']} refcount runs, "
          f"meta.db {res['store']['meta_db_bytes'] / MiB:.0f} MiB; "
          f"{'copied' if 'copied_from' in res else 'built'} in {res['build_s']:.1f} s"
          + (f", fsck {res['fsck_s']:.1f} s" if "fsck_s" in res else ""))
    print(f"{'target':<46}{'value':>12}{'goal':>10}  verdict")
    for n, v, g, ok in rows:
        print(f"{n:<46}{v:>12.3f}{'< ' + format(g, 'g'):>10}  {'pass' if ok else 'FAIL'}")
    print(f"(stat of all {res['stat_all_files']} files took {res['stat_all_s']:.1f} s; daemon RSS: empty store "
          f"{res['rss_empty_store_mib']:.1f} MiB, after mount {res['rss_after_mount_mib']:.1f}, after stat "
          f"{res['rss_after_stat_mib']:.1f}, after clones {res['rss_after_clone_mib']:.1f}; "
          f"umount {res['umount_s']:.1f} s)")
    print(f"results in {os.path.join(args.out, 'results.json')}")
    return code or (0 if all(ok for *_, ok in rows) else 2)


if __name__ == "__main__":
    sys.exit(main())
