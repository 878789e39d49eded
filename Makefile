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

.PHONY: setup run test prometheus
setup: $(BIN)/rtloop

run: setup
	$(BIN)/rtloop run --rate 20

prometheus:
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) || echo "prometheus could not be installed: the Prometheus test will be skipped"; }

test: setup prometheus
	$(BIN)/python -m pytest -q
