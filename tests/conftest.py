"""Test configuration: exactness tests opt into float64 through the ``x64`` fixture."""

import os

# The tests' programs are small and many: compiling, not running, is most of their time, and
# the least LLVM optimisation halves it (the numbers each test checks do not depend on it).
# Set before JAX creates its CPU backend; a flag the user set wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

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
