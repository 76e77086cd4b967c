# mediaserver — developer entry points.  `make test` and `make run` are all a
# newcomer needs: each one creates .venv, installs, builds the native kernels.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
NATIVE := $(wildcard native/*.pyx native/*.pxd native/*.pxi)

.PHONY: setup build run test bench bench-codecs clean

# (A venv that failed half-way, e.g. without Debian's python3.11-venv, is removed, so the next run retries.)
$(PY):
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "make: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: apt install python3.11-venv" >&2; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip || { rm -rf $(VENV); exit 1; }

# Dependencies (and the editable install) are refreshed when pyproject changes: what the server and
# `mediaserver dial` need for `make run`; the test and bench stack on top for `make test` and `make bench`.
$(RUN_STAMP): $(PY) pyproject.toml setup.py
	$(PY) -m pip install --quiet "setuptools>=77" "Cython>=3.1,<4" wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dial]"
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dial,test,bench]"
	touch $(STAMP)

setup: $(STAMP)

# Incremental rebuild of the kernels after editing native/.
build: $(RUN_STAMP)
	$(PY) setup.py --quiet build_ext --inplace -j 2

# Start the server on its built-in defaults: echo agent, port 8080, no keys.
run: build
	$(VENV)/bin/mediaserver serve

# mypy --strict over the package (settings in pyproject.toml), then the suite.
test: setup build
	$(PY) -m mypy
	$(PY) -m pytest -q

# LOAD_ARGS go to the load bench, e.g. make bench LOAD_ARGS="--quick" (or "--steps 100,200 --repeats 1").
LOAD_ARGS ?=
bench: setup bench-codecs
	$(PY) bench/frame_path.py
	$(PY) bench/tls_send.py
	$(PY) bench/load.py $(LOAD_ARGS)
	$(PY) bench/soak.py

bench-codecs: setup build
	$(PY) bench/codecs.py

clean:
	rm -rf build $(VENV) *.egg-info
	find mediaserver -name '*.so' -delete
	find native -name '*.c' -delete
