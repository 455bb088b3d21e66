"""Eight simulated CPU devices, in a process of their own (``make test`` runs this folder in a
second pytest process): XLA reads the flag when JAX first creates its CPU backend."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

DEVICES = 8
jax.config.update("jax_enable_x64", True)  # this process runs only these exactness tests


def pytest_collection_modifyitems(config, items):
    if jax.device_count() < DEVICES:  # imported too late, e.g. collected with the main suite
        skip = pytest.mark.skip(reason="needs 8 devices: run `pytest tests/multidevice` alone")
        for item in items:
            item.add_marker(skip)
