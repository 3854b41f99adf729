# Two entry points, each setting everything it needs up first:
#   make demo   installs the package with JAX on CPU (or the KERAS_BACKEND
#               given: tensorflow, torch), trains a small model
#               on offline English text, prints bits per byte
#   make test   installs everything the tests need and runs the whole suite
#               under TensorFlow, JAX and PyTorch (side by side)
# Both install under constraints.txt, the tested versions.
PYTHON ?= python3
VENV ?= .venv
BACKENDS ?= tensorflow jax torch
PY := $(VENV)/bin/python
# The demo's backend, which is also the name of the extra it installs.
DEMO_BACKEND := $(or $(KERAS_BACKEND),jax)
PIP := $(PY) -m pip install -q -c constraints.txt

.PHONY: setup demo test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# What the demo needs: the package and its backend (JAX on CPU by default).
$(VENV)/.installed-%: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e ".[$*]"
	touch $@

# Everything: the three backends, keras-hub, serving, the test tools.
$(VENV)/.installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e ".[all,test]"
	touch $@ $(foreach b,$(BACKENDS),$(VENV)/.installed-$(b))

setup: $(VENV)/.installed

demo: $(VENV)/.installed-$(DEMO_BACKEND)
	KERAS_BACKEND=$(DEMO_BACKEND) $(PY) examples/quickstart.py

# One pytest process per backend, run side by side (most of a test's time is
# compilation and single-threaded Python, so they share the cores well);
# each backend's output is printed whole once all have finished.
test: setup
	@mkdir -p $(VENV)/test-logs; for backend in $(BACKENDS); do \
	  ( KERAS_BACKEND=$$backend $(PY) -m pytest -q -p no:cacheprovider tests \
	      > $(VENV)/test-logs/$$backend.log 2>&1; \
	    echo $$? > $(VENV)/test-logs/$$backend.status ) & \
	done; wait; status=0; for backend in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$backend ==="; \
	  cat $(VENV)/test-logs/$$backend.log; \
	  [ "$$(cat $(VENV)/test-logs/$$backend.status)" = 0 ] || status=1; \
	done; exit $$status
