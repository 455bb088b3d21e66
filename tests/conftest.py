"""Test configuration: exactness tests opt into float64 through the ``x64`` fixture."""

import jax
import pytest

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
