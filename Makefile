# `make setup` is idempotent: it installs what reflinkfs needs on a fresh Debian 12 machine (as root).
VENV    ?= .venv
PY      := $(VENV)/bin/python
DEB     := fuse3 libfuse3-dev libxxhash-dev pkg-config gcc
STAMP   := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard reflinkfs/*/*.c)
	@missing=$$(for p in $(DEB); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) scripts/memory_report.py --small

bench: setup
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) build *.egg-info reflinkfs/*/*.so
