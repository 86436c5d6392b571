"""Build the reflinkfs.fuse._extops C extension (everything else is in pyproject.toml)."""
import os
import shlex
import subprocess

from setuptools import Extension, setup


def pkg_config(*args):
    try:
        out = subprocess.run(["pkg-config", *args, "fuse3"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"pkg-config fuse3 failed ({exc}); install pkg-config and libfuse3-dev") from exc
    return shlex.split(out)


cflags, libs = pkg_config("--cflags"), pkg_config("--libs")
HERE = os.path.dirname(os.path.abspath(__file__))
MAP = "reflinkfs/fuse/extops.map"  # relative: setuptools wants relative paths in depends

setup(ext_modules=[Extension(
    "reflinkfs.fuse._extops",
    sources=["reflinkfs/fuse/_extops.c"],
    depends=[MAP],
    include_dirs=[f[2:] for f in cflags if f.startswith("-I")],
    extra_compile_args=[f for f in cflags if not f.startswith("-I")] + ["-fvisibility=hidden"],
    library_dirs=[f[2:] for f in libs if f.startswith("-L")],
    libraries=[f[2:] for f in libs if f.startswith("-l")] + ["dl"],
    extra_link_args=[f for f in libs if not f.startswith(("-l", "-L"))]
    + ["-Wl,--version-script=" + os.path.join(HERE, MAP)],
)])
