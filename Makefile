# Two set-up commands: `make demo` (the main job on embedded defaults) and `make test`.
# Each creates .venv and installs what it needs on a machine with only Python >= 3.11 and make.

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	&& { command -v $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PACKAGES := aquameter protocols ingest sql pipelines dma flows simulators
DEMO_ARGS ?=

.PHONY: venv test demo lint bench clean timescale

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python >= 3.11 is required"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,flows]'
	@# DTLS for CoAP needs a C build (autoconf, automake, libtool); without them DTLS tests skip.
	$(PY) -m pip install --quiet -e '.[dev,flows,dtls]' \
	  || echo "note: aiocoap[tinydtls] did not build here; CoAP runs without DTLS"
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/aquameter demo $(DEMO_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(PACKAGES)

bench: venv
	$(PY) bench/ingest.py

# A private PostgreSQL 15 cluster preloading TimescaleDB for the tests' TimescaleDB half:
# eval "$$(make -s timescale)" && make test
timescale:
	@.ci/timescale-cluster start

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
