"""kfax.find_layers / kfax.describe: the public view of what tracing found."""

import jax.numpy as jnp

import kfax
from kfax import _tracing, report
from tests import models


def test_layer_of_is_the_public_layer_of_every_traced_site():
    params, apply_fn, x = models.linen_cnn()
    traced = _tracing.trace(apply_fn, params, x)
    assert kfax.find_layers(apply_fn, params, x).layers == tuple(
        report.layer_of(site) for site in traced.layers
    )


def test_describe_prints_every_unmatched_reason_and_a_line_per_suspect_bias():
    params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
    params["bias"] = jnp.zeros(4)

    def apply_fn(p, x):
        h = jnp.tanh(x @ p["a"]["kernel"] + p["bias"])
        return h @ p["b"]["kernel"] + p["bias"]

    table = kfax.describe(apply_fn, params, jnp.ones((2, 3)))
    lines = table.splitlines()
    assert "  bias: bias shared by layers 'a' and 'b'" in lines
    suspects = [line for line in lines if line.startswith("Suspect bias: bias ")]
    assert len(suspects) == 2
    assert "layer 'a'" in suspects[0] and "layer 'b'" in suspects[1]
    assert "does not precondition bias" in suspects[0]


def test_describe_without_suspects_prints_no_suspect_line():
    params, apply_fn, x, _ = models.mlp()
    table = kfax.describe(apply_fn, params, x)
    assert "Every parameter belongs to a layer." in table
    assert "Suspect" not in table


def test_describe_reports_the_blocks_and_factor_sizes_the_optimiser_uses():
    """Default: centred K-FAC (A is d_in wide); centering="none": homogeneous (d_in + 1); a
    layer mapped to None is listed as left to the unmatched transform."""
    params, apply_fn, inputs, _ = models.mlp(sizes=(4, 5, 3))
    rows = {
        line.split()[0]: line.split()
        for line in kfax.describe(apply_fn, params, inputs).splitlines()[2:4]
    }
    assert rows["dense_0"][6:] == ["factored", "4^2", "5^2"]
    homogeneous = kfax.describe(apply_fn, params, inputs, centering="none", block="eigen")
    assert homogeneous.splitlines()[2].split()[6:] == ["eigen", "5^2", "5^2"]
    partial = kfax.describe(apply_fn, params, inputs, block={"dense_1": None})
    assert "dense_1  dense  5     3      1          yes   none" in partial
    assert "the unmatched transform updates them): dense_1." in partial
