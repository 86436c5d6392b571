"""Benchmark reflinkfs against the ceiling of its own stack, side by side, in one run.

    python scripts/bench.py [--size-mib N] [--files N] [--repeat N] [--quick] [--out DIR]

Targets, all mounted at once on the same machine for the whole run:
  null     scripts/nullfs.py: a do-nothing pyfuse3 filesystem (same pyfuse3/trio/libfuse stack, direct_io,
           same timeouts). Nothing built on this stack can be faster, so it is the ceiling.
  shared   reflinkfs, --cache shared (the default).
  inode    reflinkfs, --cache inode (the per-inode comparison cache).
  tmpfs    the kernel's tmpfs: what the same workload costs without FUSE at all.
  disk     a plain directory on the filesystem that holds the stores: the device's and the kernel
           filesystem's own speed, the reference for cold reads and durable (fsync'ed) writes.
Optional: `nullspread` (the null fs serving each read from offset `off mod size` of a --size-mib buffer,
so big reads stream from memory as a real cache's do; null serves every read from the same cache-hot
bytes), and `--variant LABEL:CACHE:COMMAND`, a second reflinkfs daemon started with COMMAND instead of
`python -m reflinkfs.cli` (a launcher that patches the code), to A/B a change against the tree in one run.
Every result is a rate (higher is better) and is printed as a ratio to null and to tmpfs (and, below the
table, as the median of per-repetition ratios to null, which background load disturbs less, and as a
ratio to disk).

Workloads (each repeated --repeat times; the median is reported; the targets take turns within each
repetition, in an order that rotates, so background load on a shared machine hits all of them alike):
  seq_read_warm_1m / _128k  dd bs=1M / bs=128K of a reflinked copy that was read once (cached)
  rand_read_4k              os.pread of 4 KiB at random aligned offsets of that copy (requests/s)
  seq_read_cold_1m          dd bs=1M of the original right after a remount of reflinkfs (empty cache)
                            and a drop of the kernel's caches; null and tmpfs have no cold state
  seq_write_1m              dd bs=1M conv=fsync of a new file (durable: bounded by the disk, see disk)
  seq_write_1m_buffered     dd bs=1M of a new file, no fsync: what the stack costs without the disk's wait
  cp_reflink                cp --reflink=auto of the whole file (a clone on reflinkfs; a copy on tmpfs;
                            on null the daemon answers ENOSYS and the kernel copies the bytes)
  meta_create/_stat/_unlink --files empty files in one directory created (open O_CREAT|O_EXCL + close),
                            then stat'ed, then unlinked; the stat and unlink phases start after the
                            1 s entry/attribute timeout, so each of their calls reaches the daemon
  tree_stat                 tar cf /dev/null of a tree of --files small files (GNU tar reads no data
                            when the archive is /dev/null: this is a walk of lookups and getattrs)
  tree_read                 tar cf - of that tree | cat > /dev/null (reads every file)
Mount files are direct_io on both FUSE filesystems, so dd needs no iflag=direct; tmpfs is read through
its page cache, as any program would.

Before each tree workload the run waits out the 1 s entry/attribute timeout of both FUSE filesystems, so
every repetition starts with the kernel's dentry/attribute caches expired.

Profiling: `--profile-cmd "py-spy record --pid {pid} -f raw -o {out}.txt"` attaches a sampling profiler to
each FUSE daemon for exactly the duration of each measurement (files under OUT/profiles/).

Output: a table on stdout, and results.json plus ratios.png (if matplotlib can be imported; otherwise a
message) in --out (default scripts/out/bench/). `--chart-only results.json` redraws the chart with any
Python that has matplotlib.

Everything mounted is unmounted at the end, on error and on Ctrl-C/SIGTERM too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from reflinkfs.mounts import is_mounted

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
MiB = 1 << 20
FUSE_TIMEOUT = 1.0          # entry/attr timeout of both FUSE filesystems
CMD_TIMEOUT = 1800          # seconds: a hung mount must not hang the benchmark forever

# the targets of the issue; None: not a goal
GOALS = {"seq_read_warm_1m": 0.8, "seq_read_warm_128k": 0.8, "rand_read_4k": 0.8, "seq_write_1m": 0.5,
         "seq_write_1m_buffered": 0.5, "meta_create": 0.5, "meta_stat": 0.5, "meta_unlink": 0.5, "tree_stat": 0.5}
UNITS = {"seq_read_warm_1m": "MB/s", "seq_read_warm_128k": "MB/s", "rand_read_4k": "req/s",
         "seq_read_cold_1m": "MB/s", "seq_write_1m": "MB/s", "seq_write_1m_buffered": "MB/s", "cp_reflink": "MB/s", "meta_create": "ops/s",
         "meta_stat": "ops/s", "meta_unlink": "ops/s", "tree_stat": "files/s", "tree_read": "files/s"}
ORDER = list(UNITS)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, timeout: float = CMD_TIMEOUT, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd if isinstance(cmd, str) else shlex.join(cmd)} failed ({r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[-500:]}")
    return r


def drop_caches() -> None:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        log(f"cannot drop the kernel's caches ({e.strerror}); cold reads may be warm in the page cache")


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def child_pids(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


# -- targets -------------------------------------------------------------------------------------
class Target:
    name = "?"
    fuse = True

    def __init__(self, workdir: str):
        self.mnt = os.path.join(workdir, f"mnt-{self.name}")
        os.makedirs(self.mnt, exist_ok=True)
        self.mounted = False

    def mount(self) -> None:
        raise NotImplementedError

    def umount(self) -> None:
        raise NotImplementedError

    def make_cold(self) -> None:
        """Empty whatever the target caches of file data (a remount for reflinkfs)."""

    def path(self, *parts: str) -> str:
        return os.path.join(self.mnt, *parts)

    def daemon_rss(self) -> int | None:
        return None


class DaemonTarget(Target):
    """A FUSE daemon run in the foreground as our child, so that we own its process."""
    prefix: list[str] = []

    def __init__(self, workdir: str):
        super().__init__(workdir)
        self.proc: subprocess.Popen | None = None
        self.logfile = os.path.join(workdir, f"{self.name}.log")
        self.mounts = 0

    def command(self) -> list[str]:
        raise NotImplementedError

    def mount(self) -> None:
        cmd = self.command()
        if self.prefix:
            cmd = [a.replace("{target}", f"{self.name}-{self.mounts}") for a in self.prefix] + cmd
        self.mounts += 1
        # Not cwd=ROOT: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH, so a
        # --variant daemon would import this tree's code instead of its own. This tree comes first on
        # PYTHONPATH instead, where a variant's own `env PYTHONPATH=...` replaces it.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
        with open(self.logfile, "ab") as lf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                         cwd=os.path.dirname(self.mnt), env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: the daemon exited ({self.proc.returncode}) before the mount "
                                   f"was ready; see {self.logfile}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not mounted after 60 s; see {self.logfile}")
            time.sleep(0.02)
        self.mounted = True

    def _unmount_cmd(self) -> list[str]:
        return ["fusermount3", "-u", self.mnt]

    def umount(self) -> None:
        if self.proc is None:
            return
        try:
            if is_mounted(self.mnt):
                r = run(self._unmount_cmd(), check=False, timeout=300)
                if r.returncode != 0:
                    log(f"{self.name}: unmount failed ({r.stderr.strip()}); lazy unmount")
                    run(["fusermount3", "-uz", self.mnt], check=False, timeout=60)
            try:
                self.proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: daemon still running after unmount; terminating it")
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            if is_mounted(self.mnt):
                run(["fusermount3", "-uz", self.mnt], check=False, timeout=60)
            self.proc = None
            self.mounted = False

    def daemon_pid(self) -> int | None:
        if self.proc is None:
            return None
        if not self.prefix:
            return self.proc.pid
        kids = child_pids(self.proc.pid)      # the profiler's child is the daemon
        return kids[0] if kids else None

    def daemon_rss(self) -> int | None:
        pid = self.daemon_pid()
        return rss_bytes(pid) if pid else None


class NullTarget(DaemonTarget):
    name = "null"

    def __init__(self, workdir: str, name: str = "null", extra: list[str] | None = None):
        self.name = name
        self.extra = extra or []
        super().__init__(workdir)

    def command(self) -> list[str]:
        return [PY, os.path.join(HERE, "nullfs.py"), self.mnt, *self.extra]


class ReflinkTarget(DaemonTarget):
    """reflinkfs with one cache mode; `cli` replaces `python -m reflinkfs.cli` for A/B runs (--variant)."""

    def __init__(self, workdir: str, cache: str, cache_size: int, extra: list[str], name: str | None = None,
                 cli: list[str] | None = None):
        self.name = name or cache
        self.cache = cache
        self.cache_size = cache_size
        self.extra = extra
        self.cli = cli or [PY, "-m", "reflinkfs.cli"]
        super().__init__(workdir)
        self.store = os.path.join(workdir, f"store-{self.name}")
        run([PY, "-m", "reflinkfs.cli", "mkfs", self.store], cwd=ROOT)

    def command(self) -> list[str]:
        return [*self.cli, "mount", self.store, self.mnt, "--foreground", "--cache", self.cache,
                "--cache-size", str(self.cache_size), "--log", os.path.join(self.store, "log"), *self.extra]

    def _unmount_cmd(self) -> list[str]:
        return [PY, "-m", "reflinkfs.cli", "umount", self.mnt]   # waits until the daemon has flushed

    def make_cold(self) -> None:
        self.umount()
        self.mount()

    def status(self) -> dict:
        return json.loads(os.getxattr(self.mnt, "user.reflinkfs.status"))


class DiskTarget(Target):
    """A plain directory on the filesystem that holds the stores: what the device and the kernel's own
    filesystem give without FUSE (the reference for cold reads and durable writes)."""
    name = "disk"
    fuse = False

    def mount(self) -> None:
        self.mounted = True

    def umount(self) -> None:
        self.mounted = False


class TmpfsTarget(Target):
    name = "tmpfs"
    fuse = False

    def __init__(self, workdir: str, size_bytes: int):
        super().__init__(workdir)
        self.size_bytes = size_bytes

    def mount(self) -> None:
        run(["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes},mode=0755", "bench-tmpfs", self.mnt])
        self.mounted = True

    def umount(self) -> None:
        if is_mounted(self.mnt):
            r = run(["umount", self.mnt], check=False, timeout=120)
            if r.returncode != 0:
                log(f"tmpfs: umount failed ({r.stderr.strip()}); lazy unmount")
                run(["umount", "-l", self.mnt], check=False, timeout=60)
        self.mounted = False


# -- workloads: each returns (rate, seconds) ------------------------------------------------------
def timed(cmd, ok=(0,), **kw) -> float:
    t0 = time.perf_counter()
    r = run(cmd, check=False, **kw)
    dt = time.perf_counter() - t0
    if r.returncode not in ok:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return dt


def w_dd_read(t: Target, name: str, bs: str, size: int) -> tuple[float, float]:
    dt = timed(["dd", f"if={t.path(name)}", "of=/dev/null", f"bs={bs}", "status=none"])
    return size / dt / 1e6, dt


def w_rand_read(t: Target, name: str, size: int, offsets: list[int]) -> tuple[float, float]:
    fd = os.open(t.path(name), os.O_RDONLY)
    try:
        pread = os.pread
        t0 = time.perf_counter()
        for off in offsets:
            if len(pread(fd, 4096, off)) != 4096:
                raise RuntimeError(f"{t.name}: short 4 KiB read at {off}")
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return len(offsets) / dt, dt


def w_write(t: Target, rep: int, size: int, durable: bool = True) -> tuple[float, float]:
    name = t.path(f"write.{rep}")
    dt = timed(["dd", "if=/dev/zero", f"of={name}", "bs=1M", f"count={size // MiB}", "status=none"]
               + (["conv=fsync"] if durable else []))
    os.unlink(name)
    return size / dt / 1e6, dt


def w_cp(t: Target, rep: int, size: int) -> tuple[float, float]:
    dst = t.path(f"cp.{rep}")
    dt = timed(["cp", "--reflink=auto", t.path("src"), dst])
    if os.path.getsize(dst) != size:
        raise RuntimeError(f"{t.name}: cp made a file of {os.path.getsize(dst)} bytes, not {size}")
    os.unlink(dst)
    return size / dt / 1e6, dt


def w_meta(t: Target, rep: int, nfiles: int) -> dict[str, tuple[float, float]]:
    d = t.path(f"meta.{rep}")
    os.mkdir(d)
    names = [os.path.join(d, f"f{i:06d}") for i in range(nfiles)]
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    out = {}
    t0 = time.perf_counter()
    for p in names:
        os.close(os.open(p, flags, 0o644))
    dt_create = time.perf_counter() - t0
    time.sleep(FUSE_TIMEOUT + 0.1)          # each phase starts with expired entries/attributes: every
    t0 = time.perf_counter()                # stat and unlink then reaches the daemon, whatever the
    for p in names:                         # speed of the phase before
        os.stat(p)
    dt_stat = time.perf_counter() - t0
    time.sleep(FUSE_TIMEOUT + 0.1)
    t0 = time.perf_counter()
    for p in names:
        os.unlink(p)
    dt_unlink = time.perf_counter() - t0
    os.rmdir(d)
    out["meta_create"] = (nfiles / dt_create, dt_create)
    out["meta_stat"] = (nfiles / dt_stat, dt_stat)
    out["meta_unlink"] = (nfiles / dt_unlink, dt_unlink)
    return out


def tree_layout(nfiles: int) -> list[tuple[str, int]]:
    """(relative path, size) of the small-file tree: 100 files a directory, 1-8 KiB, fixed seed."""
    rnd = random.Random(7)
    return [(f"tree/d{i // 100:03d}/f{i % 100:03d}", rnd.randrange(1024, 8193)) for i in range(nfiles)]


def make_tree(t: Target, layout: list[tuple[str, int]]) -> None:
    payload = bytes(random.Random(3).getrandbits(8) for _ in range(8192))
    os.mkdir(t.path("tree"))
    for rel, size in layout:
        parent = os.path.dirname(t.path(rel))
        if not os.path.isdir(parent):
            os.mkdir(parent)
        fd = os.open(t.path(rel), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload[:size])
        finally:
            os.close(fd)


def w_tar(t: Target, nfiles: int, read: bool) -> tuple[float, float]:
    time.sleep(FUSE_TIMEOUT + 0.1)          # every repetition starts with expired entries/attributes
    if read:
        cmd = ["bash", "-c", f"set -o pipefail; tar -C {shlex.quote(t.mnt)} -cf - tree | cat > /dev/null"]
    else:
        cmd = ["bash", "-c", f"tar -C {shlex.quote(t.mnt)} -cf /dev/null tree"]
    dt = timed(cmd, ok=(0, 1))              # 1: "file changed as we read it", a warning
    return nfiles / dt, dt


# -- the run -------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args):
        self.args = args
        self.size = args.size_mib * MiB
        self.results: dict[str, dict[str, list[tuple[float, float]]]] = {w: {} for w in ORDER}
        self.targets: list[Target] = []
        self.notes: dict[str, object] = {}

    def profiled(self, workload: str, target: Target, rep: int, fn):
        """Run fn(); with --profile-cmd, sample the target's daemon (only) while it runs."""
        cmd = self.args.profile_cmd
        pid = target.daemon_pid() if isinstance(target, DaemonTarget) and cmd else None
        if not pid or (self.args.profile_targets and target.name not in self.args.profile_targets):
            return fn()
        out = os.path.join(self.args.out, "profiles")
        os.makedirs(out, exist_ok=True)
        argv = [a.replace("{pid}", str(pid)).replace("{out}", os.path.join(out, f"{target.name}.{workload}.{rep}"))
                for a in shlex.split(cmd)]
        prof = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)                    # let the profiler attach before the measurement starts
        try:
            return fn()
        finally:
            prof.send_signal(signal.SIGINT)
            try:
                prof.wait(timeout=60)
            except subprocess.TimeoutExpired:
                prof.kill()
                prof.wait()

    def record(self, workload: str, target: Target, value: tuple[float, float]) -> None:
        self.results[workload].setdefault(target.name, []).append(value)
        log(f"  {workload:<22} {target.name:<6} {value[0]:>12.1f} {UNITS[workload]:<7} ({value[1]:.3f} s)")

    def wanted(self, workload: str) -> bool:
        return not self.args.workloads or any(workload.startswith(w) or w.startswith(workload)
                                              for w in self.args.workloads)

    def rotation(self, rep: int) -> list[Target]:
        k = rep % len(self.targets)
        return self.targets[k:] + self.targets[:k]

    def setup(self) -> None:
        a = self.args
        wd = self.workdir = tempfile.mkdtemp(prefix="reflinkfs-bench-", dir=a.workdir)
        cache_size = a.cache_size or (2 * self.size + 256 * MiB)
        DaemonTarget.prefix = shlex.split(a.daemon_prefix) if a.daemon_prefix else []
        makers = {"null": lambda: NullTarget(wd),
                  "shared": lambda: ReflinkTarget(wd, "shared", cache_size, a.reflinkfs_option),
                  "inode": lambda: ReflinkTarget(wd, "inode", cache_size, a.reflinkfs_option),
                  "tmpfs": lambda: TmpfsTarget(wd, 4 * self.size + 1024 * MiB),
                  "disk": lambda: DiskTarget(wd),
                  "nullspread": lambda: NullTarget(wd, "nullspread", ["--spread-mib", str(a.size_mib)])}
        for label, cache, cli in a.variant:
            makers[label] = (lambda label=label, cache=cache, cli=cli:
                             ReflinkTarget(wd, cache, cache_size, a.reflinkfs_option, name=label, cli=cli))
        for name in a.targets + [v[0] for v in a.variant]:
            t = makers[name]()
            self.targets.append(t)
            t.mount()
            log(f"mounted {t.name} on {t.mnt}")
        self.notes["cache_size"] = cache_size
        layout = tree_layout(a.files)
        self.tree_bytes = sum(s for _, s in layout)
        for t in self.targets:
            t0 = time.perf_counter()
            run(["dd", "if=/dev/urandom", f"of={t.path('src')}", "bs=1M", f"count={a.size_mib}", "status=none"])
            run(["cp", "--reflink=auto", t.path("src"), t.path("copy")])
            run(["dd", f"if={t.path('copy')}", "of=/dev/null", "bs=1M", "status=none"])   # warm the cache
            if self.wanted("tree"):
                make_tree(t, layout)
                run(["bash", "-c", f"set -o pipefail; tar -C {shlex.quote(t.mnt)} -cf - tree | cat >/dev/null"])
            log(f"{t.name}: set up in {time.perf_counter() - t0:.1f} s")
        if any(isinstance(t, ReflinkTarget) for t in self.targets):
            for t in self.targets:
                if isinstance(t, ReflinkTarget):
                    st = t.status()
                    if not st.get("copy_file_range_handled"):
                        log(f"WARNING: {t.name}: copy_file_range is not handled; cp copies bytes")
                    log(f"{t.name}: daemon code from {st.get('code')}")
                    self.notes[f"{t.name}_code"] = st.get("code")
                    self.notes[f"{t.name}_clones_after_setup"] = st.get("clones")

    def measure(self) -> None:
        a = self.args
        reps = a.repeat
        offsets = [random.Random(42 + i).randrange(self.size // 4096) * 4096 for i in range(a.rand_requests)]
        steps = [
            ("seq_read_warm_1m", lambda t, r: w_dd_read(t, "copy", "1M", self.size)),
            ("seq_read_warm_128k", lambda t, r: w_dd_read(t, "copy", "128K", self.size)),
            ("rand_read_4k", lambda t, r: w_rand_read(t, "copy", self.size, offsets)),
            ("seq_write_1m", lambda t, r: w_write(t, r, self.size)),
            ("seq_write_1m_buffered", lambda t, r: w_write(t, r, self.size, durable=False)),
            ("cp_reflink", lambda t, r: w_cp(t, r, self.size)),
            ("meta", None),
            ("tree_stat", lambda t, r: w_tar(t, a.files, read=False)),
            ("tree_read", lambda t, r: w_tar(t, a.files, read=True)),
        ]
        for workload, fn in steps:
            if not self.wanted(workload):
                continue
            log(f"{workload}: {reps} repetitions")
            for rep in range(reps):
                for t in self.rotation(rep):
                    if workload == "meta":
                        for w, v in self.profiled(workload, t, rep, lambda: w_meta(t, rep, a.files)).items():
                            self.record(w, t, v)
                    else:
                        self.record(workload, t, self.profiled(workload, t, rep, lambda: fn(t, rep)))
            if workload == "seq_read_warm_1m":
                for t in self.targets:
                    rss = t.daemon_rss()
                    if rss:
                        self.notes[f"{t.name}_daemon_rss_after_warm_read_mib"] = round(rss / MiB, 1)
        if self.wanted("seq_read_cold_1m"):
            log(f"seq_read_cold_1m: {reps} repetitions (reflinkfs remounted before each)")
            for rep in range(reps):
                for t in self.rotation(rep):
                    t.make_cold()
                    if not a.no_drop_caches:
                        drop_caches()
                    self.record("seq_read_cold_1m", t, self.profiled("seq_read_cold_1m", t, rep,
                                                                     lambda: w_dd_read(t, "src", "1M", self.size)))

    def teardown(self) -> None:
        for t in reversed(self.targets):
            try:
                if isinstance(t, ReflinkTarget) and t.mounted:
                    self.notes[f"{t.name}_status_at_end"] = t.status()
            except OSError:
                pass
            try:
                t.umount()
                log(f"unmounted {t.name}")
            except Exception as e:  # keep going: everything else must be unmounted too
                log(f"{t.name}: unmount failed: {e}")
        if not self.args.keep and getattr(self, "workdir", None):
            if not any(is_mounted(t.mnt) for t in self.targets):
                shutil.rmtree(self.workdir, ignore_errors=True)

    # -- reporting -------------------------------------------------------------------------------
    def summary(self) -> dict:
        out = {}
        for w in ORDER:
            per = self.results[w]
            if not per:
                continue
            med = {n: statistics.median(v for v, _ in s) for n, s in per.items()}
            entry = {"unit": UNITS[w], "goal_vs_null": GOALS.get(w), "targets": {}}
            for n, s in per.items():
                entry["targets"][n] = {"median": med[n], "samples": [v for v, _ in s],
                                       "seconds": [d for _, d in s],
                                       "vs_null": med[n] / med["null"] if med.get("null") else None,
                                       "vs_tmpfs": med[n] / med["tmpfs"] if med.get("tmpfs") else None,
                                       "vs_disk": med[n] / med["disk"] if med.get("disk") else None}
                if "null" in per and len(per["null"]) == len(s):
                    # the targets of one repetition ran back to back: their ratio is less exposed to
                    # background load that drifts during the run than the ratio of medians
                    paired = [v / nv for (v, _), (nv, _) in zip(s, per["null"])]
                    entry["targets"][n]["paired_vs_null"] = {"median": statistics.median(paired),
                                                             "min": min(paired), "max": max(paired)}
            out[w] = entry
        return out


REFERENCES = ("null", "tmpfs", "disk")


def print_table(summary: dict, file=sys.stdout) -> list[str]:
    present: list[str] = []
    for e in summary.values():
        present += [n for n in e["targets"] if n not in present]
    present.sort(key=lambda n: (n != "null", n in REFERENCES, n == "disk"))
    subjects = [n for n in present if n not in REFERENCES]
    head = f"{'workload':<22}{'unit':>8}" + "".join(f"{n:>{max(11, len(n) + 2)}}" for n in present)
    ratio_cols = [(n, ref) for n in subjects for ref in ("null", "tmpfs") if ref in present]
    head += "".join(f"{n + '/' + ref:>{max(14, len(n) + len(ref) + 3)}}" for n, ref in ratio_cols)
    head += f"{'goal':>7}  verdict"
    print(head, file=file)
    print("-" * len(head), file=file)
    missed = []
    for w, e in summary.items():
        line = f"{w:<22}{e['unit']:>8}"
        for n in present:
            v = e["targets"].get(n, {}).get("median")
            wd = max(11, len(n) + 2)
            line += f"{v:>{wd}.5g}" if v is not None else f"{'-':>{wd}}"
        for n, ref in ratio_cols:
            r = e["targets"].get(n, {}).get(f"vs_{ref}")
            wd = max(14, len(n) + len(ref) + 3)
            line += f"{r:>{wd}.3f}" if r is not None else f"{'-':>{wd}}"
        goal = e["goal_vs_null"]
        verdict = ""
        if goal is not None:
            bad = [n for n in subjects if n != "nullspread" and (e["targets"].get(n, {}).get("vs_null") or 0) < goal
                   and n in e["targets"] and e["targets"][n]["vs_null"] is not None]
            verdict = "MISSED: " + ",".join(bad) if bad else "met"
            if bad:
                missed.append(w)
        line += f"{goal if goal is not None else '-':>7}  {verdict}"
        print(line, file=file)
    print(f"\nper-repetition (paired) ratio to null, median [min-max]" +
          (", and ratio of medians to disk" if "disk" in present else ""), file=file)
    for w, e in summary.items():
        cells = []
        for n in subjects:
            t = e["targets"].get(n, {})
            pr = t.get("paired_vs_null")
            if pr:
                cells.append(f"{n} {pr['median']:.3f} [{pr['min']:.2f}-{pr['max']:.2f}]")
            if t.get("vs_disk") is not None:
                cells.append(f"{n}/disk {t['vs_disk']:.3f}")
        print(f"  {w:<22}" + "   ".join(cells), file=file)
    return missed


def chart(summary: dict, path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable here: no chart (rerun with --chart-only RESULTS.json under a Python that has it)"
    ws = list(summary)
    series: list[str] = []
    for w in ws:
        series += [n for n in summary[w]["targets"] if n != "null" and n not in series]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(ws)), 5))
    width = 0.8 / max(1, len(series))
    for i, n in enumerate(series):
        ys = [summary[w]["targets"].get(n, {}).get("vs_null") or 0 for w in ws]
        ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(ws))], ys, width, label=n)
    for x, w in enumerate(ws):
        g = summary[w].get("goal_vs_null")
        if g:
            ax.plot([x - 0.45, x + 0.45], [g, g], color="red", linewidth=1.5)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(ws)))
    ax.set_xticklabels(ws, rotation=30, ha="right")
    ax.set_ylabel("rate / null fs (log scale; red: goal)")
    ax.set_title("reflinkfs and tmpfs relative to a do-nothing pyfuse3 filesystem (median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"chart written to {path}"


# -- main ----------------------------------------------------------------------------------------
def code_version() -> dict:
    """Which reflinkfs was measured: the commit, and a digest of the working tree's reflinkfs sources."""
    import hashlib
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(os.path.join(ROOT, "reflinkfs"))):
        for f in sorted(files):
            if f.endswith((".py", ".c")):
                with open(os.path.join(dirpath, f), "rb") as fh:
                    h.update(f.encode() + fh.read())
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "reflinkfs"], capture_output=True,
                           text=True)
    return {"head": head.stdout.strip() or None, "reflinkfs_sources_sha256": h.hexdigest()[:16],
            "reflinkfs_uncommitted": [l[3:] for l in dirty.stdout.splitlines()]}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024, help="size of the big file (default 1024)")
    p.add_argument("--files", type=int, default=10000, help="files for the metadata and tree workloads")
    p.add_argument("--repeat", type=int, default=5, help="repetitions of each measurement (median reported)")
    p.add_argument("--rand-requests", type=int, default=20000, help="4 KiB random reads per repetition")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: 64 MiB, 500 files, 2 repetitions")
    p.add_argument("--out", default=os.path.join(HERE, "out", "bench"), help="output directory")
    p.add_argument("--workdir", default=None, help="where stores and mountpoints go (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the stores after the run")
    p.add_argument("--targets", default="null,shared,inode,tmpfs,disk",
                   help="comma-separated subset of null,shared,inode,tmpfs,disk; also nullspread: the null fs "
                        "serving big reads from a --size-mib buffer (streaming from memory like a real cache)")
    p.add_argument("--workloads", default="", help="comma-separated prefixes of workloads to run (default all)")
    p.add_argument("--cache-size", type=int, default=0, help="reflinkfs --cache-size (default 2 x size + 256 MiB)")
    p.add_argument("--reflinkfs-option", action="append", default=[], help="extra argument for reflinkfs mount")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:CACHE:COMMAND",
                   help="an extra reflinkfs target for A/B runs: COMMAND replaces 'python -m reflinkfs.cli' for "
                        "its daemon (e.g. a launcher that patches the code), e.g. "
                        "'shared-new:shared:/path/python /tmp/launch.py'")
    p.add_argument("--daemon-prefix", default="",
                   help="command put before each FUSE daemon, e.g. a profiler; {target} becomes the target's "
                        "name and mount count (\"py-spy record -o /tmp/{target}.svg --\")")
    p.add_argument("--profile-cmd", default="",
                   help="a sampling profiler attached to a FUSE daemon for each measurement and stopped with "
                        "SIGINT after it; {pid} is the daemon, {out} a path prefix under OUT/profiles "
                        "(\"py-spy record --pid {pid} -f raw -o {out}.txt\")")
    p.add_argument("--profile-targets", default="", help="comma-separated targets to profile (default all)")
    p.add_argument("--no-drop-caches", action="store_true", help="do not drop the kernel's caches for cold reads")
    p.add_argument("--chart-only", metavar="RESULTS_JSON", help="only draw the chart of an earlier run")
    a = p.parse_args(argv)
    if a.quick:
        a.size_mib, a.files, a.repeat, a.rand_requests = min(a.size_mib, 64), min(a.files, 500), min(a.repeat, 2), min(a.rand_requests, 2000)
    a.targets = [x for x in a.targets.split(",") if x]
    for x in a.targets:
        if x not in ("null", "shared", "inode", "tmpfs", "disk", "nullspread"):
            p.error(f"--targets: unknown target {x!r}")
    if "null" not in a.targets:
        a.targets.insert(0, "null")          # every ratio is to null
    a.workloads = [x for x in a.workloads.split(",") if x]
    a.profile_targets = [x for x in a.profile_targets.split(",") if x]
    variants = []
    for v in a.variant:
        label, cache, cmd = v.split(":", 2)
        if cache not in ("shared", "inode", "none") or not label or label in ("null", "shared", "inode", "tmpfs", "disk"):
            p.error(f"--variant {v!r}: use LABEL:shared|inode|none:COMMAND with a new label")
        variants.append((label, cache, shlex.split(cmd)))
    a.variant = variants
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.chart_only:
        with open(args.chart_only) as f:
            res = json.load(f)
        print(chart(res["workloads"], os.path.join(os.path.dirname(os.path.abspath(args.chart_only)), "ratios.png")))
        return 0
    if os.geteuid() != 0:
        print("bench: must run as root (it mounts tmpfs and drops caches)", file=sys.stderr)
        return 1

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    bench = Bench(args)
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "code": code_version(), "host": platform.node(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_start": os.getloadavg(),
            "args": {k: v for k, v in vars(args).items()}}
    code = 0
    try:
        bench.setup()
        bench.measure()
    except KeyboardInterrupt:
        log("interrupted: unmounting everything")
        code = 130
    except Exception as e:
        log(f"benchmark failed: {e}")
        code = 1
    finally:
        bench.teardown()
    meta["loadavg_end"] = os.getloadavg()
    meta["code_end"] = code_version()        # the tree may change during a long run
    meta.update(bench.notes)
    summary = bench.summary()
    if not summary:
        return code or 1
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "workloads": summary}, f, indent=1)
    print()
    missed = print_table(summary)
    print(f"\nload average at start {meta['loadavg_start'][0]:.2f}, at end {meta['loadavg_end'][0]:.2f} "
          f"({os.cpu_count()} CPUs); results in {os.path.join(args.out, 'results.json')}")
    print(chart(summary, os.path.join(args.out, "ratios.png")))
    if missed:
        print("goals missed: " + ", ".join(missed))
    return code


if __name__ == "__main__":
    sys.exit(main())
