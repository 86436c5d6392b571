"""The memory report: what reading N reflinked copies of one file costs in memory, per way of serving them.

    python scripts/memory_report.py [--small] [--size BYTES] [--copies N] [--cache-size BYTES]
                                    [--modes shared,inode,kernel-cache,mmap,passthrough,passthrough-mmap,xfs]
                                    [--install-xfs] [--out DIR]

A base file of random data is written (default 256 MiB; --small: 32 MiB), --copies reflinked copies are
made with cp (default 8; --small: 4), and the copies are read fully, one after the other. After each copy
the report records

    total = daemon RSS (VmRSS of the reflinkfs daemon; 0 for XFS)
          + page cache attributable to the files: the copies' own pages, and the store's data file
            (for XFS: the loop device's backing file)

and, beside it, RssAnon, the daemon's own count of resident cache bytes, and the change of `Cached` in
/proc/meminfo (a cross-check only: anything else on the machine moves it too). The page cache of a
mount file is read with cachestat/mincore on the descriptor that read it, not with fincore(1), whose own
open of a FUSE file drops that file's pages (scripts/_memlib.py says why).

Modes (each on a fresh store and mount; the kernel's caches are dropped between modes, as root):
  shared        reflinkfs --cache shared: one cache keyed by physical extent; direct_io; O_DIRECT data file
  inode         reflinkfs --cache inode: the plain cache keyed by (inode, offset), like the kernel's
  kernel-cache  reflinkfs --cache shared --kernel-cache: the kernel caches each mount file as well
  mmap          reflinkfs --cache shared, but the copies are mapped MAP_PRIVATE and every page touched,
                by a child process (whose RSS is reported apart: its pages are the page cache counted)
  passthrough   reflinkfs --passthrough auto: the copies of a whole file, opened read-only, are read by
                the kernel from their one segment file (its page cache is counted as the store's)
  passthrough-mmap  the same, mapped and touched as in mmap
                The modes before these run with --passthrough off, so that they measure the daemon path.
                The base file, written from empty, is whole in a segment of its own; a note says if not.
  xfs           the kernel's own behaviour: XFS made with `mkfs.xfs -m reflink=1` on a loop device,
                copies made with `cp --reflink=always`; memory = page cache growth. Needs root, losetup and
                mkfs.xfs (xfsprogs is installed only with --install-xfs); skipped with the reason otherwise
The cache budget (default (copies + 1) x size) holds every copy, so `inode` is not capped by eviction.

Target: shared total after the last copy <= 1.05 x shared total after the first copy. The exit status is
1 if that is missed (or shared mode could not run), 0 otherwise.

Output in --out (default scripts/out/): memory_report.md (also printed), memory_report.json, and
memory_report.png (total memory against copies read, one line per mode) when matplotlib can be imported
(`pip install -e '.[bench]'`). Everything mounted or attached is undone at the end, on error and on
Ctrl-C/SIGTERM too.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import xxhash

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import _memlib as ml  # noqa: E402

MiB = ml.MiB
ALL_MODES = ["shared", "inode", "kernel-cache", "mmap", "passthrough", "passthrough-mmap", "xfs"]
PASSTHROUGH = ("passthrough", "passthrough-mmap")
DESCRIPTION = {
    "shared": "reflinkfs, shared cache keyed by physical extent; direct_io mount files, O_DIRECT data file",
    "inode": "reflinkfs, plain cache keyed by (inode, logical offset): what a per-inode page cache does",
    "kernel-cache": "reflinkfs shared cache, mounted --kernel-cache: the kernel also caches each mount file",
    "mmap": "reflinkfs shared cache (direct_io); copies mapped MAP_PRIVATE and touched page by page",
    "passthrough": "reflinkfs --passthrough auto: the kernel reads the copies from their one segment file",
    "passthrough-mmap": "reflinkfs --passthrough auto; copies mapped MAP_PRIVATE and touched page by page",
    "xfs": "XFS (mkfs.xfs -m reflink=1) on a loop device, cp --reflink=always: the kernel's own page cache",
}
CHUNK = MiB


class Skip(Exception):
    """A mode cannot run here; the message says why."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    from reflinkfs.units import parse_size
    p = argparse.ArgumentParser(prog="memory_report.py", description="Memory cost of reading reflinked copies.")
    p.add_argument("--small", action="store_true", help="32 MiB base file and 4 copies (the demo)")
    p.add_argument("--size", type=parse_size, help="base file size (default 256M; 32M with --small)")
    p.add_argument("--copies", type=int, help="reflinked copies to read (default 8; 4 with --small)")
    p.add_argument("--cache-size", type=parse_size, help="reflinkfs cache budget (default (copies + 1) x size)")
    p.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma-separated, from {','.join(ALL_MODES)}")
    p.add_argument("--install-xfs", action="store_true", help="apt-get install xfsprogs if mkfs.xfs is missing")
    p.add_argument("--out", default=str(HERE / "out"), help="output directory (default scripts/out/)")
    p.add_argument("--workdir", help="where to make stores and mounts (default: a new directory in $TMPDIR)")
    a = p.parse_args(argv)
    a.size = a.size or (32 * MiB if a.small else 256 * MiB)
    a.copies = a.copies or (4 if a.small else 8)
    if a.size % MiB or a.size <= 0 or a.copies < 1:
        p.error("--size must be a positive multiple of 1 MiB and --copies at least 1")
    a.cache_size = a.cache_size or (a.copies + 1) * a.size
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in ALL_MODES]
    if bad:
        p.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(ALL_MODES)}")
    return a


# -- files -----------------------------------------------------------------------------------------
def write_random(path: Path, size: int) -> int:
    """Write `size` random bytes; return their xxh3-64 digest."""
    h = xxhash.xxh3_64()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for _ in range(size // CHUNK):
            chunk = os.urandom(CHUNK)
            h.update(chunk)
            os.write(fd, chunk)
    finally:
        os.close(fd)
    return h.intdigest()


def read_fd(fd: int, buf: bytearray) -> tuple[int, int]:
    """Read an open file from its start to its end; return (bytes, xxh3-64 digest)."""
    h = xxhash.xxh3_64()
    os.lseek(fd, 0, os.SEEK_SET)
    total = 0
    mv = memoryview(buf)
    while True:
        n = os.readv(fd, [buf])
        if n == 0:
            return total, h.intdigest()
        h.update(mv[:n])
        total += n


def cp_copies(base: Path, n: int, reflink: str) -> list[Path]:
    out = []
    for i in range(1, n + 1):
        dst = base.with_name(f"copy{i}")
        subprocess.run(["cp", f"--reflink={reflink}", str(base), str(dst)], check=True, timeout=600)
        out.append(dst)
    return out


# -- one measured point --------------------------------------------------------------------------
def point(copies_read: int, pid: int | None, files_page_cache: int, backing: list[Path], cached0: int,
          status: dict | None = None, extra: dict | None = None) -> dict:
    mem = ml.proc_memory(pid) if pid else {}
    backing_pc = sum(ml.file_page_cache(p) for p in backing)
    p = {"copies_read": copies_read,
         "daemon_rss": mem.get("VmRSS", 0), "daemon_rss_anon": mem.get("RssAnon", 0),
         "files_page_cache": files_page_cache, "backing_page_cache": backing_pc,
         "meminfo_cached_delta": ml.meminfo()["Cached"] - cached0,
         "total": mem.get("VmRSS", 0) + files_page_cache + backing_pc}
    if status is not None:
        p["cache_resident"] = status["cache"].get("resident_bytes", 0)
        p["datafile_bytes_read"] = status["data_file"]["bytes_read"]
    if extra:
        p.update(extra)
    return p


def measure_copies(copies: list[Path], digest: int, pid, backing, status_fn, mapped: bool, notes: list,
                   stack: contextlib.ExitStack) -> list[dict]:
    """Open (or map) and read every copy in turn; a point before the first and after each. A progress bar
    (copies read) on a terminal, nothing otherwise."""
    from reflinkfs.progress import Progress
    bar = stack.enter_context(Progress(len(copies), "copies read", unit=""))
    dropped = ml.drop_caches()
    if dropped:
        notes.append(dropped)
    cached0 = ml.meminfo()["Cached"]
    points = []
    if mapped:
        mapper = ml.Mapper()
        stack.callback(mapper.close)
        points.append(point(0, pid, 0, backing, cached0, status_fn(), {"mapper_rss": 0}))
        for i, path in enumerate(copies, 1):
            rep = mapper.map(path)
            points.append(point(i, pid, sum(rep["page_cache"]), backing, cached0, status_fn(),
                                {"mapper_rss": rep["rss"].get("VmRSS", 0),
                                 "mapper_rss_file": rep["rss"].get("RssFile", 0)}))
            bar.advance(1)
        return points
    # every copy is opened before any is measured: opening a FUSE file drops its kernel pages
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in copies]
    for fd in fds:
        stack.callback(os.close, fd)
    buf = bytearray(CHUNK)
    points.append(point(0, pid, 0, backing, cached0, status_fn()))
    for i, fd in enumerate(fds, 1):
        n, got = read_fd(fd, buf)
        if got != digest:
            raise RuntimeError(f"{copies[i - 1]}: read {n} bytes that differ from the base file")
        points.append(point(i, pid, sum(ml.page_cache_bytes(f) for f in fds), backing, cached0, status_fn()))
        bar.advance(1)
    return points


# -- the modes ------------------------------------------------------------------------------------
def run_reflinkfs(mode: str, args, work: Path) -> dict:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        raise Skip("FUSE is not available (/dev/fuse or fusermount3 missing)")
    notes: list[str] = []
    store, mnt = work / f"store-{mode}", work / f"mnt-{mode}"
    r = subprocess.run(ml.reflinkfs_cli() + ["mkfs", str(store)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"mkfs failed: {r.stderr.strip()}")
    opts = ["--cache", "inode" if mode == "inode" else "shared", "--cache-size", str(args.cache_size),
            "--passthrough", "auto" if mode in PASSTHROUGH else "off"]
    if mode == "kernel-cache":
        opts.append("--kernel-cache")
    m = ml.ReflinkfsMount(store, mnt, opts)
    with contextlib.ExitStack() as stack:
        def unmount():
            forced = m.stop()
            if forced:
                notes.append(f"unmount of {mode} had to be forced: {'; '.join(forced)}")
        stack.callback(unmount)
        m.start()
        base = mnt / "base"
        digest = write_random(base, args.size)
        if mode in PASSTHROUGH:
            if not ml.file_info(base)["whole"]:      # written from empty, the store lays it out whole
                notes.append("the base file is NOT whole: its copies were read through the daemon")
            pt = ml.mount_status(mnt)["passthrough"]
            if not pt["active"]:
                notes.append(f"passthrough unavailable: {pt['unavailable']}")
        copies = cp_copies(base, args.copies, "auto")
        st = ml.mount_status(mnt)
        if st.get("clones", 0) < args.copies:
            notes.append(f"only {st.get('clones', 0)} of {args.copies} copies were clones "
                         "(copy_file_range not handled?): the others hold their own blocks")
        if not st["data_file"].get("direct_io"):
            notes.append("the data file is not O_DIRECT here (its pages are dropped with fadvise)")
        backing = [store / "data", *sorted((store / "segs").glob("*"))]
        points = measure_copies(copies, digest, m.pid, backing, lambda: ml.mount_status(mnt),
                                mode in ("mmap", "passthrough-mmap"), notes, stack)
        if mode in PASSTHROUGH:
            pt = ml.mount_status(mnt)["passthrough"]
            notes.append(f"passthrough opens {pt['opens']}, backing files now {pt['backing_files']}, "
                         f"daemon path instead: {pt['refusals'] or 'never'}")
    return {"points": points, "notes": notes, "daemon_pid": m.pid}


def _xfs_unavailable(install: bool) -> str | None:
    if os.geteuid() != 0:
        return "needs root (losetup, mount)"
    if shutil.which("losetup") is None:
        return "losetup not found (util-linux)"
    if shutil.which("mkfs.xfs") is None:
        if not install:
            return "mkfs.xfs not found: install xfsprogs, or pass --install-xfs"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "xfsprogs"], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
            r = subprocess.run(["apt-get", "install", "-y", "-qq", "xfsprogs"], capture_output=True, text=True,
                               env=env)
        if r.returncode != 0 or shutil.which("mkfs.xfs") is None:
            return f"installing xfsprogs failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    with open("/proc/filesystems") as f:
        if not any(line.split()[-1] == "xfs" for line in f if line.strip()):
            subprocess.run(["modprobe", "xfs"], capture_output=True)
            with open("/proc/filesystems") as g:
                if not any(line.split()[-1] == "xfs" for line in g if line.strip()):
                    return "the kernel has no XFS (modprobe xfs failed)"
    return None


def run_xfs(args, work: Path) -> dict:
    reason = _xfs_unavailable(args.install_xfs)
    if reason:
        raise Skip(reason)
    notes: list[str] = []
    img, mnt = work / "xfs.img", work / "mnt-xfs"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(max(512 * MiB, 2 * args.size + 256 * MiB))
    with contextlib.ExitStack() as stack:
        r = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(img)], capture_output=True, text=True)
        if r.returncode != 0:
            r = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
            notes.append("loop device without direct I/O: its backing file's page cache is counted too")
        if r.returncode != 0:
            raise Skip(f"losetup failed: {r.stderr.strip()}")
        dev = r.stdout.strip()
        stack.callback(subprocess.run, ["losetup", "-d", dev], capture_output=True)
        r = subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", dev], capture_output=True, text=True)
        if r.returncode != 0:
            raise Skip(f"mkfs.xfs -m reflink=1 failed: {r.stderr.strip()}")
        r = subprocess.run(["mount", "-t", "xfs", dev, str(mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            raise Skip(f"mount of the XFS loop device failed: {r.stderr.strip()}")

        def umount():
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
                notes.append("the XFS mount had to be lazily unmounted")
        stack.callback(umount)
        base = mnt / "base"
        digest = write_random(base, args.size)
        os.sync()
        used0 = _used(mnt)
        copies = cp_copies(base, args.copies, "always")
        os.sync()
        grew = _used(mnt) - used0
        if grew > args.size // 2:
            notes.append(f"the copies took {grew // MiB} MiB of XFS space: they may not share extents")
        points = measure_copies(copies, digest, None, [img], lambda: None, False, notes, stack)
    return {"points": points, "notes": notes}


def _used(path: Path) -> int:
    s = os.statvfs(path)
    return (s.f_blocks - s.f_bfree) * s.f_frsize


# -- output ---------------------------------------------------------------------------------------
def mib(n: int) -> str:
    return f"{n / MiB:.0f}"


def ratio(points: list[dict]) -> float | None:
    """Total after the last copy / total after the first."""
    if len(points) < 2 or not points[1]["total"]:
        return None
    return points[-1]["total"] / points[1]["total"]


def growth_ratio(points: list[dict]) -> float | None:
    """Memory added by reading all copies / memory added by reading the first (the baseline taken out)."""
    if len(points) < 2 or points[1]["total"] <= points[0]["total"]:
        return None
    return (points[-1]["total"] - points[0]["total"]) / (points[1]["total"] - points[0]["total"])


def markdown(report: dict) -> str:
    cfg = report["config"]
    n = cfg["copies"]
    lines = [f"# Memory report: reading {n} reflinked copies of a {cfg['size'] // MiB} MiB file", "",
             f"{report['date']}, kernel {report['kernel']}, cache budget {cfg['cache_size'] // MiB} MiB. "
             f"Total memory (MiB) = daemon RSS + page cache of the copies and of the "
             f"store's data file (XFS: of the loop device's backing file).", "",
             "| mode | " + " | ".join(str(i) for i in range(n + 1)) + f" | after {n} / after 1 | growth {n} / 1 |",
             "|---" * (n + 4) + "|"]
    for mode, res in report["modes"].items():
        if res.get("skipped"):
            continue
        pts = res["points"]
        r, g = ratio(pts), growth_ratio(pts)
        lines.append(f"| {mode} | " + " | ".join(mib(p["total"]) for p in pts) + " | "
                     f"{'' if r is None else f'{r:.2f}'} | {'' if g is None else f'{g:.2f}'} |")
    lines.append("")
    lines.append("Columns: copies read (0 = all copies made and opened, none read yet); the total after the "
                 "last copy over the total after the first; and the same for the memory added by reading "
                 "(total minus the total at 0).")
    lines.append("")
    t = report["target"]
    lines.append(t["line"])
    lines.append("")
    lines.append("## Modes")
    for mode, res in report["modes"].items():
        state = f"skipped: {res['skipped']}" if res.get("skipped") else DESCRIPTION[mode]
        lines.append(f"- **{mode}**: {state}")
        for note in res.get("notes", []):
            lines.append(f"  - note: {note}")
    lines.append("")
    lines.append("## Details (MiB)")
    lines.append("")
    lines.append("| mode | copies read | daemon RSS | RssAnon | page cache, copies | page cache, data/backing file"
                 " | daemon cache resident | meminfo Cached delta | mapper RSS | total |")
    lines.append("|---" * 10 + "|")
    for mode, res in report["modes"].items():
        for p in res.get("points", []):
            lines.append(f"| {mode} | {p['copies_read']} | {mib(p['daemon_rss'])} | {mib(p['daemon_rss_anon'])} | "
                         f"{mib(p['files_page_cache'])} | {mib(p['backing_page_cache'])} | "
                         f"{mib(p['cache_resident']) if 'cache_resident' in p else '-'} | "
                         f"{mib(p['meminfo_cached_delta'])} | "
                         f"{mib(p['mapper_rss']) if 'mapper_rss' in p else '-'} | {mib(p['total'])} |")
    lines.append("")
    if "mmap" in report["modes"] and not report["modes"]["mmap"].get("skipped"):
        lines.append("mmap: the mapper's RSS is the copies' page-cache pages it maps, already in the page "
                     "cache column, so it is not added to the total. With direct_io, read(2) bypasses the "
                     "kernel page cache, but a private mapping is filled from each FUSE inode's own page "
                     "cache: mapped reads (executables, shared libraries) cost one copy per file.")
        lines.append("")
    if report.get("plot"):
        lines.append(f"Plot: {report['plot']}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> str | None:
    """Draw the PNG; return None when done, else why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"plot skipped: matplotlib cannot be imported ({e}); pip install -e '.[bench]'"
    cfg = report["config"]
    fig, ax = plt.subplots(figsize=(8, 5))
    style = {"shared": ("-", "o"), "inode": ("-", "s"), "kernel-cache": ("-", "^"), "mmap": ("--", "x"),
             "passthrough": ("-", "P"), "passthrough-mmap": ("--", "*"), "xfs": (":", "d")}        # distinct, so that lines lying on each other stay visible
    for mode, res in report["modes"].items():
        if res.get("skipped"):
            continue
        xs = [p["copies_read"] for p in res["points"]]
        ls, marker = style.get(mode, ("-", "o"))
        ax.plot(xs, [p["total"] / MiB for p in res["points"]], linestyle=ls, marker=marker, label=mode)
    ax.set_xlabel("copies read")
    ax.set_ylabel("total memory, MiB (daemon RSS + attributable page cache)")
    ax.set_title(f"Reading reflinked copies of a {cfg['size'] // MiB} MiB file")
    ax.set_xticks(range(cfg["copies"] + 1))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# -- main -----------------------------------------------------------------------------------------
def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="reflinkfs-memreport-", dir=args.workdir))
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "kernel": platform.release(),
              "config": {"size": args.size, "copies": args.copies, "cache_size": args.cache_size,
                         "modes": args.modes, "workdir": str(work)},
              "modes": {}}
    if os.geteuid() != 0:
        report["config"]["warning"] = "not root: the kernel's caches are not dropped between modes"
    try:
        for mode in args.modes:
            print(f"[{mode}] {DESCRIPTION[mode]}", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                res = run_xfs(args, work) if mode == "xfs" else run_reflinkfs(mode, args, work)
            except Skip as e:
                res = {"skipped": str(e)}
                print(f"[{mode}] skipped: {e}", file=sys.stderr)
            res["seconds"] = round(time.monotonic() - t0, 1)
            report["modes"][mode] = res
            if res.get("points"):
                print(f"[{mode}] totals (MiB): {' '.join(mib(p['total']) for p in res['points'])}",
                      file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("memory_report: interrupted; everything was unmounted", file=sys.stderr)
        return 130
    finally:
        if any(ml.is_mounted(p) for p in work.iterdir() if p.is_dir()):
            print(f"memory_report: something is still mounted under {work}; not removing it", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    shared = report["modes"].get("shared", {})
    r = ratio(shared.get("points", []))
    n = args.copies
    if r is None:
        line = f"shared: not measured ({shared.get('skipped', 'not run')}); target not checked"
    else:
        line = (f"shared: total after {n} copies / after first copy = {r:.3f} (target <= 1.05: "
                f"{'met' if r <= 1.05 else 'NOT MET'})")
    for mode in PASSTHROUGH:
        pr = ratio(report["modes"].get(mode, {}).get("points", []))
        if pr is not None:
            line += (f"\n\n{mode}: total after {n} copies / after first copy = {pr:.3f} (target <= 1.05: "
                     f"{'met' if pr <= 1.05 else 'NOT MET'})")
    report["target"] = {"line": line, "ratio": r, "met": r is not None and r <= 1.05}
    for mode in ("inode", "kernel-cache", "mmap", "passthrough", "passthrough-mmap", "xfs"):
        res = report["modes"].get(mode, {})
        if res.get("points"):
            report["target"][f"{mode}_ratio"] = ratio(res["points"])
            report["target"][f"{mode}_growth_ratio"] = growth_ratio(res["points"])
    png = out / "memory_report.png"
    why_not = plot(report, png)
    report["plot"] = str(png) if why_not is None else why_not
    (out / "memory_report.json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    (out / "memory_report.md").write_text(md)
    print(md)
    print(f"written: {out / 'memory_report.md'}, {out / 'memory_report.json'}"
          + (f", {png}" if why_not is None else f" ({why_not})"))
    return 0 if report["target"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
