"""Build the C extensions, reflinkfs.fuse._extops and reflinkfs.core._sums (everything else is in
pyproject.toml)."""
import os
import shlex
import subprocess

from setuptools import Extension, setup


def pkg_config(package, needed, *args):
    try:
        out = subprocess.run(["pkg-config", *args, package], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"pkg-config {package!r} failed ({exc}); needs pkg-config and {needed}") from exc
    return shlex.split(out)


# libfuse >= 3.17, built by `make setup` into build/libfuse/prefix (PKG_CONFIG_PATH points there).
FUSE_HINT = "libfuse >= 3.17 (make setup builds it into build/libfuse/prefix and sets PKG_CONFIG_PATH)"
pkg_config("fuse3 >= 3.17", FUSE_HINT, "--exists")
cflags, libs = pkg_config("fuse3", FUSE_HINT, "--cflags"), pkg_config("fuse3", FUSE_HINT, "--libs")
fuse_libdirs = [f[2:] for f in libs if f.startswith("-L")]
xxh_cflags = pkg_config("libxxhash", "libxxhash-dev", "--cflags")
xxh_libs = pkg_config("libxxhash", "libxxhash-dev", "--libs")
HERE = os.path.dirname(os.path.abspath(__file__))
MAP = "reflinkfs/fuse/extops.map"  # relative: setuptools wants relative paths in depends

setup(ext_modules=[Extension(
    "reflinkfs.fuse._extops",
    sources=["reflinkfs/fuse/_extops.c"],
    depends=[MAP],
    include_dirs=[f[2:] for f in cflags if f.startswith("-I")],
    extra_compile_args=[f for f in cflags if not f.startswith("-I")] + ["-fvisibility=hidden"],
    library_dirs=fuse_libdirs,
    libraries=[f[2:] for f in libs if f.startswith("-l")] + ["dl"],
    extra_link_args=[f for f in libs if not f.startswith(("-l", "-L"))] + [f"-Wl,-rpath,{d}" for d in fuse_libdirs]
    + ["-Wl,--version-script=" + os.path.join(HERE, MAP)],
), Extension(
    "reflinkfs.core._sums",
    sources=["reflinkfs/core/_sums.c"],
    include_dirs=[f[2:] for f in xxh_cflags if f.startswith("-I")],
    library_dirs=[f[2:] for f in xxh_libs if f.startswith("-L")],
    libraries=[f[2:] for f in xxh_libs if f.startswith("-l")],
)])
