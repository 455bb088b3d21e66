# Developer entry points. Every target that runs Python first makes sure its virtualenv exists
# and has the project installed, so `make demo` and `make test` work on a fresh clone.

PYTHON ?= python3
OLDJAX := 0.9.0.1
# Tests run in the old-JAX environment (make test-oldjax OLDJAX_TESTS="tests/...").
OLDJAX_TESTS ?= tests/test_tracing.py tests/test_layers_scan.py tests/test_inner_products.py
PYTEST_ARGS ?=

VENV := .venv
VENV_OLDJAX := .venv-oldjax
VENV_BENCH := .venv-bench

.PHONY: venv demo test notebooks lint format test-oldjax bench-venv clean distclean
.PHONY: bench-quick bench-autoencoder bench-step-cost bench-transformer bench-scaling bench-gpu-data

venv: $(VENV)/.installed

# The stamp is rebuilt whenever pyproject.toml changes; the venv itself is kept if present.
# Installs go through uv (from the package index, into the venv): 16 s against pip's 97 s for
# the test extra on the project's machine; plain pip if uv cannot be installed.
PIP_INSTALL = sh -c 'if "$$0" -m pip install -q uv; then "$$(dirname "$$0")/uv" pip install --python "$$0" "$$@"; else "$$0" -m pip install "$$@"; fi'

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(VENV)/bin/python -e '.[test]'
	touch $@

demo: venv
	$(VENV)/bin/python -m examples.demo

# The main suite, then the multi-device tests in a process of their own (8 simulated devices).
# Whole files go to the two workers in tests/conftest.py's order, longest first: xdist's default
# reorder (by number of tests) left the notebooks' file, about four minutes, to run alone last.
test: venv
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q $(PYTEST_ARGS)
	$(VENV)/bin/python -m pytest tests/multidevice -n 2 --dist load -q $(PYTEST_ARGS)

# Only the research notebooks (tests/test_notebooks.py, also part of `make test`): each runs in a
# fresh kernel, asserts its conclusions and saves its figures to notebooks/figures/; prints each
# one's time. KFAX_MNIST_DIR=/nonexistent make notebooks runs them on the digits fallback.
notebooks: venv
	$(VENV)/bin/python -m pytest tests/test_notebooks.py -p no:xdist -s --durations=0 -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# One pip call, so the resolver picks flax/orbax releases that accept the pinned JAX.
$(VENV_OLDJAX)/.installed: pyproject.toml
	test -x $(VENV_OLDJAX)/bin/python || $(PYTHON) -m venv $(VENV_OLDJAX)
	$(PIP_INSTALL) $(VENV_OLDJAX)/bin/python -e '.[test]' 'jax==$(OLDJAX)' 'jaxlib==$(OLDJAX)'
	touch $@

test-oldjax: $(VENV_OLDJAX)/.installed
	$(VENV_OLDJAX)/bin/python -m pytest $(OLDJAX_TESTS) -n 2 -q $(PYTEST_ARGS)

# kfac-jax 0.0.8 (the reference the benchmarks compare against) runs with JAX 0.9.0.1.
$(VENV_BENCH)/.installed: pyproject.toml
	test -x $(VENV_BENCH)/bin/python || $(PYTHON) -m venv $(VENV_BENCH)
	$(PIP_INSTALL) $(VENV_BENCH)/bin/python -e '.[bench]' 'jax==$(OLDJAX)' 'jaxlib==$(OLDJAX)'
	touch $@

bench-venv: $(VENV_BENCH)/.installed

# The full benchmark runs (benchmarks/README.md gives their durations; run them on a quiet
# machine). Every peer runs interleaved in one process in .venv-bench (JAX $(OLDJAX), the only
# JAX kfac-jax runs on); BENCH_PYTHON=.venv/bin/python runs them on .venv's JAX without kfac-jax.
BENCH_PYTHON ?= $(VENV_BENCH)/bin/python
BENCH_DEPS := $(if $(filter $(VENV_BENCH)/bin/python,$(BENCH_PYTHON)),$(VENV_BENCH)/.installed,venv)
BENCH_ENV := OPENBLAS_NUM_THREADS=1
BENCH_TAG ?=
AUTOENCODER_OPTIMIZERS := adam,muon,psgd,kfac,kfac_adaptive,kfac_adaptive+stats_every=1+model_batch_size=False+inverse_every=10,kfac_jax,kfac_jax+damping=1.0+num_burnin_steps=0,kfac_jax_fixed
TRANSFORMER_OPTIMIZERS := adam,muon,psgd,kfac,kfac_adaptive,kfac_adaptive+damping=1.0,kfac_jax

bench-quick: venv
	$(VENV)/bin/python -m benchmarks.run --quick --task autoencoder --optimizers adam,muon,kfac,kfac_adaptive --out /tmp/kfax-bench-quick
	$(VENV)/bin/python -m benchmarks.run --quick --task transformer --optimizers adam,muon,kfac,kfac_adaptive --out /tmp/kfax-bench-quick
	$(VENV)/bin/python -m benchmarks.step_cost --quick --configs adam,kfac --out /tmp/kfax-bench-quick

bench-autoencoder: $(BENCH_DEPS)
	$(BENCH_ENV) $(BENCH_PYTHON) -m benchmarks.run --task autoencoder --budget-seconds 120 --optimizers "$(AUTOENCODER_OPTIMIZERS)" --tag "$(BENCH_TAG)"

bench-step-cost: $(BENCH_DEPS)
	$(BENCH_ENV) $(BENCH_PYTHON) -m benchmarks.step_cost --task autoencoder --steps 40 --repeats 3 --tag "$(BENCH_TAG)"
	$(BENCH_ENV) $(BENCH_PYTHON) -m benchmarks.step_cost --task transformer --configs adam,muon,psgd,kfac,kfac_adaptive,kfac+stats_every=1,kfac_adaptive+stats_every=1+inverse_every=10,kfac_jax --steps 40 --repeats 3 --tag "$(BENCH_TAG)"

bench-transformer: $(BENCH_DEPS)
	$(BENCH_ENV) $(BENCH_PYTHON) -m benchmarks.run --task transformer --budget-seconds 90 --optimizers "$(TRANSFORMER_OPTIMIZERS)" --tag "$(BENCH_TAG)"

bench-scaling: $(BENCH_DEPS)
	$(BENCH_ENV) $(BENCH_PYTHON) -m benchmarks.scaling --tag "$(BENCH_TAG)"

# MNIST inside the checkout (ignored by git: *-ubyte.gz), for machines without ../shared, such
# as the GPU machine (carry benchmarks/data/mnist there; benchmarks/gpu.sh finds it).
bench-gpu-data:
	mkdir -p benchmarks/data/mnist
	cp ../shared/data/mnist/t10k-images-idx3-ubyte.gz ../shared/data/mnist/t10k-labels-idx1-ubyte.gz benchmarks/data/mnist/

# Build and cache artefacts only; `distclean` also removes the three virtualenvs.
clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
	find . -path './.venv*' -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV) $(VENV_OLDJAX) $(VENV_BENCH)
