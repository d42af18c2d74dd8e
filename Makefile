# Two commands on a fresh Debian 12 host, as root: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint bench kernel-matrix clean

install:
	@scripts/install.sh

demo: install
	@$(PY) -m lab.demo

test: install
	@$(PY) -m pytest -q -rs

lint: install
	@$(VENV)/bin/ruff check .

bench: install
	@$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache
