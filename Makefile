# Quick start: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
TESTDEPS := $(VENV)/.installed-test

.PHONY: demo test test-fast clean

$(RUNTIME): setup.cfg pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# The pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[data]'
	touch $(RUNTIME)

$(TESTDEPS): $(RUNTIME)
	$(VPY) -m pip install -q -e '.[test]'
	touch $(TESTDEPS)

# The demo needs only the runtime dependencies (no test oracles), so a fresh machine is quick.
demo: $(RUNTIME)
	OMP_NUM_THREADS=2 $(VPY) scripts/demo.py

test: $(TESTDEPS)
	$(VPY) -m pytest -q -ra tests

test-fast: $(TESTDEPS)
	$(VPY) -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf $(VENV) build *.egg-info runs
