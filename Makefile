# Two commands do everything on a fresh machine:
#   make run    set up .venv and run `rtloop run --rate 20` on the embedded defaults
#   make test   set up .venv (and a local Prometheus server if apt can install one) and run the tests
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl

$(BIN)/rtloop: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU wheel first: an unpinned torch would pull a multi-GB CUDA build. On a GPU machine with torch
	# already installed, create the venv with --system-site-packages instead.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# openpi's real client pins numpy<2: it gets a venv of its own, used by tests/serve/test_openpi_client.py
OPENPI_VENV := .venv-openpi
$(OPENPI_VENV)/bin/python:
	$(PY) -m venv $(OPENPI_VENV)
	# typing_extensions: imported by openpi_client but missing from its declared dependencies
	$(OPENPI_VENV)/bin/pip install -q openpi-client==0.1.2 typing_extensions

.PHONY: setup run test prometheus openpi-client
setup: $(BIN)/rtloop

run: setup
	$(BIN)/rtloop run --rate 20

prometheus:
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) || echo "prometheus could not be installed: the Prometheus test will be skipped"; }

openpi-client: $(OPENPI_VENV)/bin/python

test: setup prometheus openpi-client
	$(BIN)/python -m pytest -q
