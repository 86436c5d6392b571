"""The daemon path against the practical ceiling of FUSE: reflinkfs beside libfuse's passthrough_hp.

    python scripts/bench_daemon.py [--quick] [--repeat N] [--targets ...] [--variant LABEL:COMMAND]

Builds libfuse's own C++ example `passthrough_hp` from the libfuse source `make setup` unpacked
(build/libfuse/src/fuse3-*/example, compiled into build/bench/, linked to build/libfuse/prefix; for
measurement only, outside the package), mounts every target at once, and prints in one run the median of
--repeat repetitions (targets take turns, in an order that rotates) of:

  tar_x        tar -xf of a tarball of Python's standard library (/usr/lib/python3.11, made once)
  create       N empty files created in one directory (open O_CREAT|O_EXCL + close, in this process)
  ls_l         ls -l of that directory
  rm_rf        rm -rf of it
  randwrite    4 KiB random pwrite()s at aligned offsets of a 256 MiB file (a small C loop, no O_DIRECT,
               like fio's default buffered randwrite; fio itself is not installed), IOPS
  randread     the same loop with pread(), before the writes (on the freshly written file) and after
  read2        a 1 GiB file written with dd bs=1M, read twice with dd bs=1M: the second read, GB/s

Before ls_l and rm_rf the kernel's dentry and inode caches are dropped (`echo 2 > drop_caches`), so that
every target answers from its own state: passthrough_hp keeps entries for a day, reflinkfs for 1 s.

Targets:
  reflinkfs      reflinkfs with default options (no --cache-size: the budget it picks itself)
  reflinkfs-dp   reflinkfs --passthrough off (the daemon path), when `reflinkfs mount` has that option
  passthrough_hp libfuse's example with its default options, over a directory on the disk's filesystem
  ext4           a directory on the filesystem that holds everything (ext4 on this machine's disk)
  tmpfs          a tmpfs
  null           scripts/nullfs.py, the do-nothing pyfuse3 filesystem: only for read2, its 1 MiB reads
                 are the ceiling the second read is measured against (it serves every read from the same
                 cache-hot buffer)
  null-spread    the same serving offset `off mod size` of a buffer as big as the file, so that its reads
                 stream from memory as a cache's do (read2 only; shows how much of the gap to null is
                 memory bandwidth)
`--variant LABEL:COMMAND` adds a reflinkfs daemon started with COMMAND instead of `python -m
reflinkfs.cli` (a launcher that patches the code), to compare a change with the tree in the same run.

At the end: the issue's ratios, each marked met or not met. The machine may be shared: compare within
one run only.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (PY, ROOT, DaemonTarget, NullTarget, ReflinkTarget, Target, TmpfsTarget,  # noqa: E402
                   is_mounted, log, run)

MiB = 1 << 20
BUILD = os.path.join(ROOT, "build", "bench")
STDLIB = "/usr/lib/python3.11"

RANDIO_C = r"""
/* randio FILE MODE COUNT SEED: COUNT 4 KiB pread/pwrite at random aligned offsets of FILE; prints IOPS */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: randio FILE r|w COUNT SEED\n"); return 2; }
    int wr = argv[2][0] == 'w';
    long count = atol(argv[3]);
    unsigned long long x = strtoull(argv[4], NULL, 10) * 2654435761ULL + 1;
    int fd = open(argv[1], wr ? O_RDWR : O_RDONLY);
    if (fd < 0) { perror(argv[1]); return 1; }
    struct stat st;
    fstat(fd, &st);
    long blocks = st.st_size / 4096;
    static char buf[4096] __attribute__((aligned(4096)));
    memset(buf, 0x5a, sizeof buf);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        off_t off = (off_t)(x % (unsigned long long)blocks) * 4096;
        buf[0] = (char)i;
        ssize_t n = wr ? pwrite(fd, buf, 4096, off) : pread(fd, buf, 4096, off);
        if (n != 4096) { perror("io"); return 1; }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%.1f %.6f\n", count / s, s);
    return close(fd) == 0 ? 0 : 1;
}
"""


# -- building the tools ----------------------------------------------------------------------------
def libfuse_source() -> str:
    found = sorted(glob.glob(os.path.join(ROOT, "build", "libfuse", "src", "fuse3-*", "example",
                                          "passthrough_hp.cc")))
    if not found:
        raise RuntimeError("libfuse's source is not unpacked under build/libfuse/src: run 'make setup' first")
    return os.path.dirname(found[-1])


def build_passthrough_hp() -> str:
    """build/bench/passthrough_hp, from the same libfuse source and against the same libfuse as set-up."""
    src = libfuse_source()
    prefix = os.path.join(ROOT, "build", "libfuse", "prefix")
    out = os.path.join(BUILD, "passthrough_hp")
    os.makedirs(BUILD, exist_ok=True)
    cc = os.path.join(src, "passthrough_hp.cc")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(cc):
        if shutil.which("g++") is None:
            raise RuntimeError("g++ is missing: run 'make setup' (it installs the Debian package g++)")
        # the defines libfuse's meson build puts in its config.h for this example (all present on Linux)
        run(["g++", "-O2", "-std=c++17", "-Wall", "-DHAVE_UTIMENSAT", "-DHAVE_POSIX_FALLOCATE", "-DHAVE_SETXATTR",
             "-o", out, cc, f"-I{src}", f"-I{prefix}/include/fuse3",
             f"-L{prefix}/lib", f"-Wl,-rpath,{prefix}/lib", "-lfuse3", "-lpthread"])
    return out


def build_randio() -> str:
    out = os.path.join(BUILD, "randio")
    os.makedirs(BUILD, exist_ok=True)
    c = out + ".c"
    if not os.path.exists(c) or open(c).read() != RANDIO_C:
        with open(c, "w") as f:
            f.write(RANDIO_C)
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(c):
        run(["gcc", "-O2", "-Wall", "-o", out, c])
    return out


# -- targets ---------------------------------------------------------------------------------------
class ReflinkDefault(ReflinkTarget):
    """reflinkfs with its default options (the cache budget it picks itself), plus `extra`."""

    def __init__(self, workdir: str, name: str, extra: list[str], cli: list[str] | None = None):
        super().__init__(workdir, "shared", 0, extra, name=name, cli=cli)

    def command(self) -> list[str]:
        return [*self.cli, "mount", self.store, self.mnt, "--foreground",
                "--log", os.path.join(self.store, "log"), *self.extra]


class PassthroughHp(DaemonTarget):
    name = "passthrough_hp"

    def __init__(self, workdir: str, binary: str):
        self.binary = binary
        super().__init__(workdir)
        self.source = os.path.join(workdir, "passthrough_hp-source")
        os.makedirs(self.source, exist_ok=True)

    def command(self) -> list[str]:
        return [self.binary, "--foreground", self.source, self.mnt]


class DirTarget(Target):
    """A plain directory on the filesystem that holds the work directory."""
    fuse = False

    def __init__(self, workdir: str, name: str):
        self.name = name
        super().__init__(workdir)

    def mount(self) -> None:
        self.mounted = True

    def umount(self) -> None:
        self.mounted = False


def has_passthrough_option() -> bool:
    r = run([PY, "-m", "reflinkfs.cli", "mount", "--help"], check=False, cwd=ROOT)
    return "--passthrough" in r.stdout


def fstype_of(path: str) -> str:
    r = run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "--target", path], check=False)
    return r.stdout.strip() or "?"


# -- workloads -------------------------------------------------------------------------------------
def drop_dentries() -> None:
    """Drop the kernel's dentries and inodes (every filesystem's: FUSE ones are forgotten)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, all its threads, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    run(cmd)
    return time.perf_counter() - t0


def w_tar(t: Target, rep: int, tarball: str) -> float:
    d = t.path(f"tar.{rep}")
    os.mkdir(d)
    return timed(["tar", "-xf", tarball, "-C", d])


def w_creates(t: Target, rep: int, n: int) -> float:
    d = t.path(f"many.{rep}")
    os.mkdir(d)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
    t0 = time.perf_counter()
    for p in names:
        os.close(os.open(p, flags, 0o644))
    return time.perf_counter() - t0


def w_ls(t: Target, rep: int, n: int) -> float:
    drop_dentries()
    t0 = time.perf_counter()
    r = subprocess.run(["ls", "-l", t.path(f"many.{rep}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    listed = r.stdout.count(b"\n") - 1
    if r.returncode != 0 or listed != n:
        raise RuntimeError(f"{t.name}: ls -l failed or listed {listed} of {n}: "
                           f"{r.stderr.decode().strip()[-300:]}")
    return dt


def w_rm(t: Target, rep: int) -> float:
    drop_dentries()
    dt = timed(["rm", "-rf", t.path(f"many.{rep}")])
    run(["rm", "-rf", t.path(f"tar.{rep}")])
    return dt


def w_randio(randio: str, t: Target, rep: int, mode: str, count: int) -> tuple[float, float]:
    out = run([randio, t.path("rand"), mode, str(count), str(rep * 2 + (mode == "w"))]).stdout.split()
    return float(out[0]), float(out[1])


def w_read2(t: Target, rep: int, size: int, after=None) -> float:
    name = t.path(f"big.{rep}")
    if isinstance(t, NullTarget):          # its writes are discarded: only the size and the reads count
        run(["truncate", "-s", str(size), name])
    else:
        run(["dd", "if=/dev/zero", f"of={name}", "bs=1M", f"count={size // MiB}", "status=none"])
    run(["dd", f"if={name}", "of=/dev/null", "bs=1M", "status=none"])
    dt = timed(["dd", f"if={name}", "of=/dev/null", "bs=1M", "status=none"])
    if after is not None:
        after()                          # while the file, and what the cache holds of it, is still there
    os.unlink(name)
    return size / dt / 1e9


# -- the run ---------------------------------------------------------------------------------------
ROWS = [  # key, label, unit, higher is better
    ("tar_x", "tar -xf of Python's standard library", "s", False),
    ("create", "creates in one directory", "s", False),
    ("ls_l", "ls -l of them", "s", False),
    ("rm_rf", "rm -rf of them", "s", False),
    ("randwrite", "4 KiB random writes, 256 MiB file", "IOPS", True),
    ("randread_before", "4 KiB random reads before those writes", "IOPS", True),
    ("randread_after", "4 KiB random reads after them", "IOPS", True),
    ("read2", "1 GiB file, second dd bs=1M read", "GB/s", True),
]


class Bench:
    def __init__(self, args):
        self.args = args
        self.targets: list[Target] = []
        self.results: dict[str, dict[str, list[float]]] = {k: {} for k, *_ in ROWS}
        self.notes: dict[str, object] = {}
        self.cpu: dict[str, dict[str, list[float]]] = {}

    def cpu_of(self, key: str, t: Target, fn):
        """Run fn() and record the CPU time the target's daemon used meanwhile (all its threads): what a
        request costs the daemon, less exposed than elapsed time to other load on a shared machine."""
        pid = t.daemon_pid() if isinstance(t, DaemonTarget) else None
        c0 = cpu_seconds(pid) if pid else None
        value = fn()
        if c0 is not None and pid:
            c1 = cpu_seconds(pid)
            if c1 is not None:
                self.cpu.setdefault(key, {}).setdefault(t.name, []).append(c1 - c0)
        return value

    def rec(self, key: str, t: Target, value: float) -> None:
        self.results[key].setdefault(t.name, []).append(value)
        unit = next(u for k, _, u, _ in ROWS if k == key)
        log(f"  {key:<16} {t.name:<15} {value:>12.3f} {unit}")

    def setup(self) -> None:
        a = self.args
        wd = self.workdir = tempfile.mkdtemp(prefix="reflinkfs-bench-daemon-", dir=a.workdir)
        self.randio = build_randio()
        hp = build_passthrough_hp() if "passthrough_hp" in a.targets else ""
        makers = {
            "reflinkfs": lambda: ReflinkDefault(wd, "reflinkfs", a.reflinkfs_option),
            "reflinkfs-dp": lambda: ReflinkDefault(wd, "reflinkfs-dp", ["--passthrough", "off", *a.reflinkfs_option]),
            "passthrough_hp": lambda: PassthroughHp(wd, hp),
            "ext4": lambda: DirTarget(wd, "ext4"),
            "tmpfs": lambda: TmpfsTarget(wd, 2 * a.big_mib * MiB + 1024 * MiB),
            "null": lambda: NullTarget(wd),
            "null-spread": lambda: NullTarget(wd, "null-spread", ["--spread-mib", str(a.big_mib)]),
        }
        names = list(a.targets)
        if "reflinkfs-dp" in names and not has_passthrough_option():
            log("reflinkfs has no --passthrough option yet: its default mount is the daemon path; "
                "reflinkfs-dp left out")
            names.remove("reflinkfs-dp")
        for name in names:
            self.targets.append(makers[name]())
        for label, cmd in a.variant:
            self.targets.append(ReflinkDefault(wd, label, a.reflinkfs_option, cli=shlex.split(cmd)))
        self.notes["ext4"] = f"a directory on {fstype_of(wd)} (the filesystem of {wd})"
        for t in self.targets:
            t.mount()
            log(f"mounted {t.name} on {t.mnt}")
        self.tarball = os.path.join(wd, "stdlib.tar")
        with tarfile.open(self.tarball, "w") as tf:
            tf.add(a.stdlib, arcname="stdlib", filter=self._tar_filter)
        with tarfile.open(self.tarball) as tf:
            members = tf.getmembers()
        self.notes["tarball"] = {"source": a.stdlib, "entries": len(members),
                                 "bytes": sum(m.size for m in members)}
        for t in self.fs_targets():
            run(["dd", "if=/dev/urandom", f"of={t.path('rand')}", "bs=1M", f"count={a.rand_mib}", "status=none"])

    def _tar_filter(self, info: tarfile.TarInfo):
        return None if self.args.quick and "/test" in info.name else info

    def fs_targets(self) -> list[Target]:
        """Every target but null (which serves the read2 ceiling only)."""
        return [t for t in self.targets if not isinstance(t, NullTarget)]

    def rotation(self, targets: list[Target], rep: int) -> list[Target]:
        k = rep % len(targets)
        return targets[k:] + targets[:k]

    def measure(self) -> None:
        a = self.args
        for rep in range(a.repeat):
            log(f"repetition {rep + 1} of {a.repeat}")
            fs = self.rotation(self.fs_targets(), rep) if self.fs_targets() else []
            if a.only in (None, "meta"):
                for t in fs:
                    self.rec("tar_x", t, self.cpu_of("tar_x", t, lambda: w_tar(t, rep, self.tarball)))
                for t in fs:
                    self.rec("create", t, self.cpu_of("create", t, lambda: w_creates(t, rep, a.files)))
                for t in fs:
                    self.rec("ls_l", t, self.cpu_of("ls_l", t, lambda: w_ls(t, rep, a.files)))
                for t in fs:
                    self.rec("rm_rf", t, self.cpu_of("rm_rf", t, lambda: w_rm(t, rep)))
            for t in fs if a.only in (None, "randio") else []:
                self.rec("randread_before", t, w_randio(self.randio, t, rep, "r", a.rand_ops)[0])
                self.rec("randwrite", t, w_randio(self.randio, t, rep, "w", a.rand_ops)[0])
                self.rec("randread_after", t, w_randio(self.randio, t, rep, "r", a.rand_ops)[0])
                # a fresh file for the next repetition, so that every "before" reads a sequentially written one
                os.unlink(t.path("rand"))
                run(["dd", "if=/dev/urandom", f"of={t.path('rand')}", "bs=1M", f"count={a.rand_mib}",
                     "status=none"])
            for t in self.rotation(self.targets, rep) if a.only in (None, "read2") else []:
                def note(t=t):
                    self.notes[f"{t.name}_cache_after_read2"] = {
                        k: v for k, v in t.status()["cache"].items()
                        if k in ("budget_bytes", "resident_bytes", "budget_source", "last_shrink")}
                self.rec("read2", t, w_read2(t, rep, a.big_mib * MiB,
                                             note if isinstance(t, ReflinkTarget) else None))

    def teardown(self) -> None:
        for t in reversed(self.targets):
            try:
                t.umount()
            except Exception as e:   # noqa: BLE001 - everything else must be unmounted too
                log(f"{t.name}: unmount failed: {e}")
        if getattr(self, "workdir", None) and not any(is_mounted(t.mnt) for t in self.targets):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- report --------------------------------------------------------------------------------------
    def medians(self) -> dict[str, dict[str, float]]:
        return {k: {n: statistics.median(v) for n, v in per.items()} for k, per in self.results.items()}

    def report(self) -> list[tuple[str, bool | None]]:
        med = self.medians()
        names = [t.name for t in self.fs_targets()]
        print(f"\nmedian of {self.args.repeat}; {self.args.files} files, random I/O {self.args.rand_ops} ops on "
              f"{self.args.rand_mib} MiB, read2 {self.args.big_mib} MiB")
        print(f"tarball: {self.notes['tarball']['entries']} entries, "
              f"{self.notes['tarball']['bytes'] / MiB:.1f} MiB of {self.args.stdlib}; ext4: {self.notes['ext4']}")
        head = f"| workload | {' | '.join(names)} |"
        print(head)
        print("|---" * (len(names) + 1) + "|")
        for key, label, unit, _ in ROWS:
            cells = []
            for n in names:
                v = med[key].get(n)
                cells.append("-" if v is None else f"{v:,.2f} {unit}" if unit != "IOPS" else f"{v:,.0f} {unit}")
            print(f"| {label} | {' | '.join(cells)} |")
        if self.cpu:
            cpu_names = [n for n in names if any(n in per for per in self.cpu.values())]
            print("\ndaemon CPU seconds (median; user + system, all threads of the daemon)")
            print(f"| workload | {' | '.join(cpu_names)} |")
            print("|---" * (len(cpu_names) + 1) + "|")
            for key, label, _, _ in ROWS:
                if key in self.cpu:
                    cells = [f"{statistics.median(self.cpu[key][n]):.2f}" if n in self.cpu[key] else "-"
                             for n in cpu_names]
                    print(f"| {label} | {' | '.join(cells)} |")
        if "null" in med["read2"]:
            print(f"null (do-nothing pyfuse3), 1 MiB reads of a 1 GiB file: {med['read2']['null']:.2f} GB/s")
        if "null-spread" in med["read2"]:
            print(f"null-spread (the same, each read from its own offset of a buffer as big as the file, as a "
                  f"cache's reads are): {med['read2']['null-spread']:.2f} GB/s")
        verdicts: list[tuple[str, bool | None]] = []
        subject = "reflinkfs-dp" if "reflinkfs-dp" in names else "reflinkfs"
        others = [t.name for t in self.targets if isinstance(t, ReflinkTarget) and t.name != subject]
        print(f"\nratios of the issue, for {subject}" + (f" (and {', '.join(others)})" if others else "") + ":")
        for who in [subject, *others]:
            checks = []
            hp = "passthrough_hp"
            for key in ("tar_x", "create", "ls_l", "rm_rf"):
                checks.append((f"{key}: time / passthrough_hp's", med[key].get(who), med[key].get(hp), 2.0, "<="))
            checks.append(("randwrite: IOPS / passthrough_hp's", med["randwrite"].get(who),
                           med["randwrite"].get(hp), 0.5, ">="))
            checks.append(("randread after / before the writes", med["randread_after"].get(who),
                           med["randread_before"].get(who), 0.8, ">="))
            checks.append(("read2 (default options) / null's 1 MiB reads", med["read2"].get(who),
                           med["read2"].get("null"), 0.8, ">="))
            for what, v, ref, goal, op in checks:
                if v is None or not ref:
                    print(f"  {who:<13} {what:<48} n/a")
                    verdicts.append((f"{who} {what}", None))
                    continue
                r = v / ref
                ok = r <= goal if op == "<=" else r >= goal
                print(f"  {who:<13} {what:<48} {r:6.2f}  (goal {op} {goal})  {'met' if ok else 'NOT MET'}")
                verdicts.append((f"{who} {what}", ok))
        for n, v in self.notes.items():
            if n.endswith("_cache_after_read2"):
                print(f"{n}: {json.dumps(v)}")
        return verdicts


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: 1 repetition, 2,000 files, 5,000 random ops, 256 MiB read2, no test/ in the tarball")
    p.add_argument("--repeat", type=int, default=None, help="repetitions (default 3; --quick: 1)")
    p.add_argument("--files", type=int, default=None, help="files created in one directory (default 10000)")
    p.add_argument("--rand-ops", type=int, default=None, help="random 4 KiB operations per phase (default 20000)")
    p.add_argument("--rand-mib", type=int, default=256, help="size of the random-I/O file (default 256)")
    p.add_argument("--big-mib", type=int, default=None, help="size of the read2 file (default 1024)")
    p.add_argument("--stdlib", default=STDLIB, help=f"the tree that is tarred (default {STDLIB})")
    p.add_argument("--targets", nargs="+",
                   default=["reflinkfs", "reflinkfs-dp", "passthrough_hp", "ext4", "tmpfs", "null", "null-spread"],
                   choices=["reflinkfs", "reflinkfs-dp", "passthrough_hp", "ext4", "tmpfs", "null", "null-spread"])
    p.add_argument("--only", choices=["meta", "randio", "read2"],
                   help="only these rows: meta (tar -xf, creates, ls -l, rm -rf), randio, or read2")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:COMMAND",
                   help="another reflinkfs daemon, started with COMMAND instead of 'python -m reflinkfs.cli'")
    p.add_argument("--reflinkfs-option", action="append", default=[], help="an extra option of every reflinkfs mount")
    p.add_argument("--workdir", default=None, help="where stores, mountpoints and the ext4 directory go "
                                                   "(default: the system's temporary directory)")
    a = p.parse_args(argv)
    quick = a.quick
    a.repeat = a.repeat or (1 if quick else 3)
    a.files = a.files or (2000 if quick else 10000)
    a.rand_ops = a.rand_ops or (5000 if quick else 20000)
    a.big_mib = a.big_mib or (256 if quick else 1024)
    variants = []
    for v in a.variant:
        label, sep, cmd = v.partition(":")
        if not sep or not label or not cmd:
            p.error(f"--variant {v!r}: use LABEL:COMMAND")
        variants.append((label, cmd))
    a.variant = variants
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("bench_daemon: must run as root (it mounts and drops the kernel's dentry cache)", file=sys.stderr)
        return 1
    random.seed(1)
    bench = Bench(args)
    code = 0
    try:
        bench.setup()
        bench.measure()
    except KeyboardInterrupt:
        log("interrupted: unmounting everything")
        code = 130
    except Exception as e:   # noqa: BLE001 - reported, then everything is unmounted
        log(f"benchmark failed: {e}")
        code = 1
    finally:
        bench.teardown()
    if code:
        return code
    print(f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs; the machine may be shared)")
    verdicts = bench.report()
    missed = [w for w, ok in verdicts if ok is False]
    print(f"\n{len(verdicts) - len(missed)} of {len(verdicts)} ratios met or n/a")
    return 0


if __name__ == "__main__":
    sys.exit(main())
