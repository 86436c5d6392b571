# `make setup` is idempotent: it installs what reflinkfs needs on a fresh Debian 12 machine (as root).
#  1. Debian packages: fuse3 (fusermount3), libxxhash-dev, the tools that build libfuse, acl and
#     sqlite3 (the tests drive setfacl, getfacl and sqlite3 on a mount), and g++ (scripts/bench_daemon.py
#     builds libfuse's C++ example passthrough_hp, for measurement only);
#  2. libfuse 3.17 from Debian's fuse3 source package, into build/libfuse/prefix (scripts/build-libfuse.sh;
#     the system's libfuse 3.14 stays): FUSE passthrough and shared mmap of direct_io files need >= 3.17;
#  3. .venv with pyfuse3 $(PYFUSE3) compiled against that libfuse, then reflinkfs with its test extras.
VENV    ?= .venv
PY      := $(VENV)/bin/python
DEB     := fuse3 libxxhash-dev pkg-config gcc g++ meson ninja-build dpkg-dev debian-archive-keyring acl sqlite3
PYFUSE3 := 3.5.0
LIBFUSE := $(CURDIR)/build/libfuse/prefix
export PKG_CONFIG_PATH := $(LIBFUSE)/lib/pkgconfig
STAMP   := $(VENV)/.installed
DEBS    := build/.debs
LIBFUSE_STAMP := $(LIBFUSE)/.built
PYFUSE3_STAMP := $(VENV)/.pyfuse3-$(PYFUSE3)

.PHONY: setup test lint demo bench bench-daemon clean install uninstall

setup: $(STAMP)

$(DEBS): Makefile
	@missing=$$(for p in $(DEB); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@mkdir -p build && touch $@

$(LIBFUSE_STAMP): scripts/build-libfuse.sh | $(DEBS)
	bash scripts/build-libfuse.sh build/libfuse
	touch $@

# pyfuse3 has no wheels: it compiles against the libfuse that pkg-config finds (ours, see above), and
# keeps an rpath to it. The check after the install fails loudly if it linked anything else.
$(PYFUSE3_STAMP): $(LIBFUSE_STAMP)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	LDFLAGS="-Wl,-rpath,$(LIBFUSE)/lib" $(PY) -m pip install -q --no-binary pyfuse3 --no-cache-dir \
		--force-reinstall --no-deps pyfuse3==$(PYFUSE3)
	$(PY) -m pip install -q pyfuse3==$(PYFUSE3)
	$(PY) -c 'import pyfuse3, subprocess, sys; \
		out = subprocess.run(["ldd", pyfuse3.__file__], capture_output=True, text=True).stdout; \
		sys.exit(0 if "$(LIBFUSE)/lib/libfuse3.so" in out else "pyfuse3 is not linked to $(LIBFUSE):\n" + out)'
	touch $@

$(STAMP): pyproject.toml setup.py $(wildcard reflinkfs/*/*.c) reflinkfs/fuse/extops.map $(PYFUSE3_STAMP) | $(DEBS)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# ruff and mypy, pinned in the test extras, on the package (settings in pyproject.toml)
lint: setup
	$(PY) -m ruff check reflinkfs
	$(PY) -m mypy

demo: setup
	$(PY) scripts/memory_report.py --small

# the daemon path against the do-nothing FUSE filesystem, tmpfs and disk; then passthrough on and off
# (memory of 1-8 clones read, mapped and executed; cached and cold reads of a whole clone)
bench: setup
	$(PY) scripts/bench.py
	$(PY) scripts/bench_passthrough.py

# the daemon path against libfuse's passthrough_hp, ext4 and tmpfs; QUICK=1: a few minutes
bench-daemon: setup
	$(PY) scripts/bench_daemon.py $(if $(QUICK),--quick)

# Optional: `mount -t fuse.reflinkfs` and fstab lines. mount(8) looks for its helper in /sbin only; this
# writes /sbin/mount.fuse.reflinkfs, a two-line wrapper that runs this checkout's .venv (`make uninstall`
# removes it, and only it).
SBIN ?= /sbin
install: setup
	$(PY) -m reflinkfs.mounthelper install $(SBIN)

uninstall:
	$(PY) -m reflinkfs.mounthelper uninstall $(SBIN)

clean:
	rm -rf $(VENV) build *.egg-info reflinkfs/*/*.so
