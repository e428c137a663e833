# The front door. `make serve` and `make test` both build the environment on first use.
PY_BOOT ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup system-deps serve test test-core test-shared lint typecheck clean

# torch must come first: the CPU wheel of torch 2.13.0 is picked up by pip's
# configured find-links; installing torchvision first would pull a CUDA torch.
$(STAMP): pyproject.toml
	$(PY_BOOT) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests use as real peers: DCMTK (storescu, echoscu,
# storescp, dsrdump), headless Chromium, dicom3tools (dciodvfy), Orthanc, openssl,
# strace and PostgreSQL (initdb/pg_ctl: the tests start their own server).
system-deps:
	@bash scripts/system-deps.sh

# Flags go through: make serve ARGS="--dicom-port 11113 --config site.toml"
serve: setup
	$(BIN)/triage serve $(ARGS)

test: setup system-deps
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-core: setup system-deps
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not shared"

test-shared: setup system-deps
	$(BIN)/python -m pytest -q -m shared

lint: setup
	$(BIN)/ruff check triage dicom_io tests bench

typecheck: setup
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
