# Developer entry points. Every target that runs Python first makes sure its virtualenv exists
# and has the project installed, so `make demo` and `make test` work on a fresh clone.

PYTHON ?= python3
OLDJAX := 0.9.0.1
# Tests run in the old-JAX environment (make test-oldjax OLDJAX_TESTS="tests/...").
OLDJAX_TESTS ?= tests/test_tracing.py tests/test_capture.py tests/test_transform.py
PYTEST_ARGS ?=

VENV := .venv
VENV_OLDJAX := .venv-oldjax
VENV_BENCH := .venv-bench

.PHONY: venv demo test lint format test-oldjax bench-venv clean distclean

venv: $(VENV)/.installed

# The stamp is rebuilt whenever pyproject.toml changes; the venv itself is kept if present.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -e '.[test]'
	touch $@

demo: venv
	$(VENV)/bin/python -m examples.demo

# The main suite, then the multi-device tests in a process of their own (8 simulated devices).
test: venv
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile -q $(PYTEST_ARGS)
	$(VENV)/bin/python -m pytest tests/multidevice -n 2 --dist loadfile -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# One pip call, so the resolver picks flax/orbax releases that accept the pinned JAX.
$(VENV_OLDJAX)/.installed: pyproject.toml
	test -x $(VENV_OLDJAX)/bin/python || $(PYTHON) -m venv $(VENV_OLDJAX)
	$(VENV_OLDJAX)/bin/python -m pip install -e '.[test]' 'jax==$(OLDJAX)' 'jaxlib==$(OLDJAX)'
	touch $@

test-oldjax: $(VENV_OLDJAX)/.installed
	$(VENV_OLDJAX)/bin/python -m pytest $(OLDJAX_TESTS) -n 2 -q $(PYTEST_ARGS)

# kfac-jax 0.0.8 (the reference the benchmarks compare against) runs with JAX 0.9.0.1.
$(VENV_BENCH)/.installed: pyproject.toml
	test -x $(VENV_BENCH)/bin/python || $(PYTHON) -m venv $(VENV_BENCH)
	$(VENV_BENCH)/bin/python -m pip install -e '.[bench]' 'jax==$(OLDJAX)' 'jaxlib==$(OLDJAX)'
	touch $@

bench-venv: $(VENV_BENCH)/.installed

# Build and cache artefacts only; `distclean` also removes the three virtualenvs.
clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
	find . -path './.venv*' -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV) $(VENV_OLDJAX) $(VENV_BENCH)
