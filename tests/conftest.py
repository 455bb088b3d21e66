"""Test configuration: exactness tests opt into float64 through the ``x64`` fixture."""

import os

# The tests' programs are small and many: compiling, not running, is most of their time (an
# eagerly run op compiles a program of its own). The least LLVM optimisation halves it, and
# XLA:CPU's older loop emitter for fusions halves it again (the nnx language-model test: 26 s
# -> 13 s); the numbers each test checks do not depend on either. Set before JAX creates its CPU
# backend (subprocesses inherit them); a flag the user set wins.
TEST_XLA_FLAGS = {
    "xla_backend_optimization_level": "0",
    "xla_cpu_use_fusion_emitters": "false",
}
for _flag, _value in TEST_XLA_FLAGS.items():
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_flag}={_value}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# Eight simulated devices need a process of their own: `make test` runs tests/multidevice in a
# second pytest invocation (XLA reads the device-count flag when JAX creates its CPU backend).
collect_ignore = ["multidevice"]


@pytest.fixture
def x64():
    """Run a test in float64 (exactness tests compare against dense references)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


# The longest files first: `make test` hands whole files to its two workers (--dist loadfile,
# --no-loadscope-reorder keeps this order), so a long file scheduled last (the notebooks, about
# four minutes) would run alone at the end. Measured on a clean clone, 2026-11-30.
LONGEST_FIRST = (
    "test_notebooks.py",
    "test_transform_conformance.py",
    "test_transformer.py",
    "test_benchmarks.py",
    "test_multiprocess.py",
    "test_training.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
