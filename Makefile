# Two commands on a fresh Debian 12 host, as root: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint bench deb kernel-matrix clean

install:
	@scripts/install.sh

demo: install
	@$(PY) -m lab.demo

test: install
	@$(PY) -m pytest -q -rs --durations=25

lint: install
	@$(VENV)/bin/ruff check .

bench: install
	@$(PY) -m bench.run

# A Debian package (dpkg-deb): venv in /opt/interlock, CLI on PATH, systemd unit, default config.
deb:
	@pkg/build-deb.sh dist

# Boot each Debian kernel under QEMU (no network device), run `interlock doctor` and the datapath
# suite inside, plus the same on the host kernel; a table, and non-zero on any failure.
# KERNELS: series (6.1 6.12) or releases (6.1.0-47-amd64); MATRIX_ARGS: e.g. --jobs 2 --keep
# --no-host --doc docs/KERNELS.md (see vagrant/README.md).
KERNELS ?= 6.1 6.12
MATRIX_ARGS ?=
kernel-matrix: install
	@$(PY) -m vagrant.matrix --kernels "$(KERNELS)" $(MATRIX_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache dist
