# Two entry points, each setting everything up first:
#   make demo   trains a small model on offline English text, prints bits per byte
#   make test   runs the whole test suite under TensorFlow, JAX and PyTorch
PYTHON ?= python3
VENV ?= .venv
BACKENDS ?= tensorflow jax torch
PY := $(VENV)/bin/python

.PHONY: setup demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all,test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	KERAS_BACKEND=$${KERAS_BACKEND:-jax} $(PY) examples/quickstart.py

test: setup
	@status=0; for backend in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$backend ==="; \
	  KERAS_BACKEND=$$backend $(PY) -m pytest -q -p no:cacheprovider tests || status=1; \
	done; exit $$status
