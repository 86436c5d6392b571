"""FUSE passthrough measured: reflinkfs --passthrough auto against --passthrough off and against the store's
own filesystem, side by side in one run.

    python scripts/bench_passthrough.py [--size 256M] [--repeat 3] [--tree-files 1500] [--prog EXE] [--out DIR]

Two stores are made with the same files, each written from empty and so whole in a segment of its
own: `base` (--size random bytes), `prog` (a copy of --prog, an
executable: the system's python3) and `tree` (the first --tree-files files of the Python standard library). Both are
mounted at once, `on` with --passthrough auto and `off` with --passthrough off, and 8 clones of each are
made in each (cp --reflink=auto; reflinkfs clone -r for the tree).

Memory (total = daemon RSS + page cache of the mount files + page cache of the store's files, data and
segments; MiB), after N = 1, 2, 4, 8 clones:
  read   the clones of base read with read(2), one after the other
  mmap   ... mapped MAP_PRIVATE and every page touched, by a child process
  exec   the clones of prog run, each left running (its mapped pages stay) until all are measured;
         counted as daemon RSS + the sum of the runs' PSS of their mapped executable (distinct pages once)
  tree   the stdlib tree and its 8 clones read (tar to /dev/null); after 1 tree and after 9
Speed (rates; ratio to `disk`, the same bytes read from the segment's file on the store's filesystem):
  cached_1m / cached_4k   dd bs=1M / bs=4k of clone 1, read once before (warm page cache, warm daemon cache)
  cold_1m                 dd bs=1M of clone 1 after dropping the kernel's caches (and remounting `off`,
                          whose daemon cache would otherwise still hold it)
Each speed row is measured --repeat times, the targets taking turns in a rotating order; the median is
reported. The machine may be shared: compare the ratios, not the rates across runs.

Output: a table on stdout and bench_passthrough.json in --out (default scripts/out/). Needs root (drop
caches, passthrough). Everything mounted is unmounted at the end, on error and on Ctrl-C too.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import _memlib as ml  # noqa: E402

MiB = ml.MiB
NS = (1, 2, 4, 8)
CLONES = 8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the stores ---------------------------------------------------------------------------------------
def stdlib_files(limit: int) -> list[tuple[str, bytes]]:
    """(relative path, contents) of the first `limit` non-empty files of the standard library, sorted."""
    root = Path(os.__file__).parent
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "site-packages", "test"))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink() and p.stat().st_size > 0:
                out.append((str(p.relative_to(root)), p.read_bytes()))
                if len(out) >= limit:
                    return out
    return out


def make_store(store: Path, base: bytes, prog: bytes, tree: list[tuple[str, bytes]]) -> None:
    """mkfs, then the files written from empty through the volume: each whole in a segment of its own."""
    from reflinkfs.core.volume import Volume
    from reflinkfs.meta.schema import mkfs
    mkfs(str(store))
    v = Volume.open(str(store))
    inos = [v.create(1, b"base", 0o644, 0, 0).ino, v.create(1, b"prog", 0o755, 0, 0).ino]
    v.write(inos[0], 0, base)
    v.write(inos[1], 0, prog)
    dirs = {"": v.mkdir(1, b"tree", 0o755, 0, 0).ino}
    for rel, data in tree:
        parent = ""
        for part in Path(rel).parent.parts:
            path = os.path.join(parent, part)
            if path not in dirs:
                dirs[path] = v.mkdir(dirs[parent], part.encode(), 0o755, 0, 0).ino
            parent = path
        ino = v.create(dirs[parent], Path(rel).name.encode(), 0o644, 0, 0).ino
        v.write(ino, 0, data)
        inos.append(ino)
    not_whole = [ino for ino in inos if not v.wholeness(ino).whole]
    v.close()
    if not_whole:
        raise SystemExit(f"bench_passthrough: {len(not_whole)} files written from empty are not whole")


def store_files(store: Path) -> list[Path]:
    return [store / "data", *(store / "segs").iterdir()]


# -- memory -------------------------------------------------------------------------------------------
def total(pid: int, fds: list[int], store: Path, extra: int = 0) -> dict:
    rss = ml.proc_memory(pid).get("VmRSS", 0)
    mount_pc = sum(ml.page_cache_bytes(fd) for fd in fds) + extra
    store_pc = sum(ml.file_page_cache(p) for p in store_files(store))
    return {"daemon_rss": rss, "mount_page_cache": mount_pc, "store_page_cache": store_pc,
            "total": rss + mount_pc + store_pc}


def mem_read(m: ml.ReflinkfsMount, store: Path) -> dict:
    fds = [os.open(m.mnt + f"/c{i}", os.O_RDONLY | os.O_CLOEXEC) for i in range(1, CLONES + 1)]
    try:
        ml.drop_caches()
        out = {}
        buf = bytearray(MiB)
        for i, fd in enumerate(fds, 1):
            while os.readv(fd, [buf]):
                pass
            if i in NS:
                out[i] = total(m.pid, fds, store)
        return out
    finally:
        for fd in fds:
            os.close(fd)


def mem_mmap(m: ml.ReflinkfsMount, store: Path) -> dict:
    ml.drop_caches()
    mapper = ml.Mapper()
    try:
        out = {}
        for i in range(1, CLONES + 1):
            rep = mapper.map(m.mnt + f"/c{i}")
            if i in NS:
                out[i] = total(m.pid, [], store, extra=sum(rep["page_cache"]))
        return out
    finally:
        mapper.close()


def mapped_pss(pid: int, prefixes: tuple[str, ...]) -> int:
    """Proportional set size of the clean pages of a process's mappings of files under `prefixes`: shared
    pages are divided among the processes mapping them, so the sum over processes counts each distinct
    page-cache page once."""
    pss, current = 0, ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if not first.endswith(":"):                 # a mapping's header: range perms off dev inode path
                parts = line.split(maxsplit=5)
                current = parts[5].strip() if len(parts) == 6 else ""
            elif first in ("Pss:", "Pss_Dirty:") and current.startswith(prefixes):
                # clean pages only: the written (relocated) ones are each process's own on any filesystem
                pss += int(line.split()[1]) * 1024 * (1 if first == "Pss:" else -1)
    return pss


def mem_exec(m: ml.ReflinkfsMount, store: Path) -> dict:
    """Run the clones of prog, each kept running (its mapped pages stay). The page cache of a mount file
    on the daemon path cannot be read with cachestat here (each open drops the inode's pages), so what the
    runs hold is counted as the sum of their mappings' PSS: each distinct page once."""
    paths = [m.mnt + f"/p{i}" for i in range(1, CLONES + 1)]
    procs: list[subprocess.Popen] = []
    try:
        ml.drop_caches()
        out = {}
        for i, p in enumerate(paths, 1):
            pr = subprocess.Popen([p, "-S", "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(pr)
            if pr.stdout.readline().strip() != "up":
                raise RuntimeError(f"{p} did not start")
            if i in NS:
                pss = sum(mapped_pss(x.pid, (m.mnt, str(store))) for x in procs)
                rss = ml.proc_memory(m.pid).get("VmRSS", 0)
                out[i] = {"daemon_rss": rss, "mapped_pss": pss, "total": rss + pss}
        return out
    finally:
        for pr in procs:
            pr.kill()
            pr.wait()


def mem_tree(m: ml.ReflinkfsMount, store: Path) -> dict:
    ml.drop_caches()
    out = {}
    for i, name in enumerate(["tree"] + [f"t{k}" for k in range(1, CLONES + 1)], 1):
        subprocess.run(f"tar cf - -C {m.mnt} {name} | cat > /dev/null", shell=True, check=True)
        if i in (1, CLONES + 1):
            out[i] = total(m.pid, [], store)
    return out


# -- speed --------------------------------------------------------------------------------------------
def dd(path: str, bs: str) -> float:
    t = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={bs}"], check=True, capture_output=True)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    from reflinkfs.units import parse_size
    p = argparse.ArgumentParser(prog="bench_passthrough.py", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=parse_size, default=256 * MiB)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tree-files", type=int, default=1500)
    p.add_argument("--prog", default=os.path.realpath("/usr/bin/python3") if os.path.exists("/usr/bin/python3")
                   else os.path.realpath(sys.executable),
                   help="the executable cloned and run (default: the system's python3, whose interpreter is in "
                        "the executable itself on Debian)")
    p.add_argument("--out", default=str(HERE / "out"))
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="reflinkfs-pt-"))
    log(f"work in {work}; making two stores ({a.size // MiB} MiB base, {a.tree_files} stdlib files)")
    base = os.urandom(a.size)
    with open(a.prog, "rb") as f:
        prog = f.read()
    tree = stdlib_files(a.tree_files)
    report: dict = {"kernel": os.uname().release, "size": a.size, "repeat": a.repeat,
                    "tree_files": len(tree), "tree_bytes": sum(len(d) for _, d in tree),
                    "prog_bytes": len(prog), "memory": {}, "speed": {}, "passthrough": {}}
    mounts = {}
    with contextlib.ExitStack() as stack:
        for name in ("on", "off"):
            store, mnt = work / f"store-{name}", work / f"mnt-{name}"
            make_store(store, base, prog, tree)
            m = ml.ReflinkfsMount(store, mnt, ["--passthrough", "auto" if name == "on" else "off"])
            stack.callback(m.stop)
            m.start()
            mounts[name] = (m, store)
            for i in range(1, CLONES + 1):
                subprocess.run(["cp", "--reflink=auto", f"{mnt}/base", f"{mnt}/c{i}"], check=True)
                subprocess.run(["cp", "--reflink=auto", "--preserve=mode", f"{mnt}/prog", f"{mnt}/p{i}"], check=True)
                subprocess.run(ml.reflinkfs_cli() + ["clone", "-r", f"{mnt}/tree", f"{mnt}/t{i}"], check=True,
                               capture_output=True)
        st = ml.mount_status(mounts["on"][0].mnt)["passthrough"]
        if not st["active"]:
            log(f"passthrough is unavailable here: {st['unavailable']}")
            return 1
        for row, fn in (("read", mem_read), ("mmap", mem_mmap), ("exec", mem_exec), ("tree", mem_tree)):
            for name, (m, store) in mounts.items():
                log(f"memory: {row} ({name})")
                report["memory"].setdefault(row, {})[name] = fn(m, store)
        # speed: clone 1 of each mount, and the segment file of `on` read directly
        seg = str(mounts["on"][1] / "segs" / "1")
        targets = {"on": mounts["on"][0].mnt + "/c1", "off": mounts["off"][0].mnt + "/c1", "disk": seg}
        times: dict = {}
        for rep in range(a.repeat):
            order = list(targets)[rep % 3:] + list(targets)[:rep % 3]
            for t in order:
                dd(targets[t], "1M")                      # warm
                times.setdefault(("cached_1m", t), []).append(dd(targets[t], "1M"))
                times.setdefault(("cached_4k", t), []).append(dd(targets[t], "4k"))
            for t in order:
                if t == "off":
                    m = mounts["off"][0]
                    m.stop()
                    m.start()
                ml.drop_caches()
                times.setdefault(("cold_1m", t), []).append(dd(targets[t], "1M"))
        for (row, t), ts in times.items():
            report["speed"].setdefault(row, {})[t] = a.size / statistics.median(ts) / 1e6   # MB/s
        report["passthrough"] = ml.mount_status(mounts["on"][0].mnt)["passthrough"]
    shutil.rmtree(work, ignore_errors=True)
    lines = table(report)
    print("\n".join(lines))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_passthrough.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bench_passthrough.md").write_text("\n".join(lines) + "\n")
    return 0


def table(r: dict) -> list[str]:
    mib = lambda n: f"{n / MiB:.0f}"   # noqa: E731
    lines = [f"## Passthrough: memory (MiB; daemon RSS + page cache of mount files and store), kernel {r['kernel']}",
             "", "| workload | mode | " + " | ".join(f"N={n}" for n in NS) + " | N=8 / N=1 |", "|---" * 7 + "|"]
    for row in ("read", "mmap", "exec"):
        for mode, pts in r["memory"][row].items():
            vals = [pts[n]["total"] for n in NS]
            lines.append(f"| {row} | {mode} | " + " | ".join(mib(v) for v in vals) + f" | {vals[-1] / vals[0]:.2f} |")
    lines += ["", f"Tree: {r['tree_files']} stdlib files ({r['tree_bytes'] // 1024} KiB), read once, then with its "
              f"{CLONES} clones (tar to /dev/null)", "", "| mode | after 1 tree | after 9 trees | ratio |",
              "|---|---|---|---|"]
    for mode, pts in r["memory"]["tree"].items():
        one, nine = pts[1]["total"], pts[CLONES + 1]["total"]
        lines.append(f"| {mode} | {mib(one)} | {mib(nine)} | {nine / one:.2f} |")
    lines += ["", f"## Passthrough: reads of clone 1 of a {r['size'] // MiB} MiB whole file (MB/s, median of "
              f"{r['repeat']}; ratio to disk = the segment's file read directly)", "",
              "| workload | on | off | disk | on / disk | off / disk |", "|---|---|---|---|---|---|"]
    for row, v in r["speed"].items():
        lines.append(f"| {row} | {v['on']:.0f} | {v['off']:.0f} | {v['disk']:.0f} | {v['on'] / v['disk']:.2f} | "
                     f"{v['off'] / v['disk']:.2f} |")
    p = r["passthrough"]
    lines += ["", f"passthrough opens {p['opens']}, daemon path instead: {p['refusals'] or 'never'}"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
