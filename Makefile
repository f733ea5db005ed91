# Quick start: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# The pinned CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=2 $(VPY) scripts/demo.py

test: $(STAMP)
	$(VPY) -m pytest -q -ra tests

test-fast: $(STAMP)
	$(VPY) -m pytest -q -ra -m "not slow" tests

clean:
	rm -rf $(VENV) build *.egg-info
