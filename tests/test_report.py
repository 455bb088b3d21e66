"""kfax.find_layers / kfax.describe: the public view of what tracing found."""

import jax
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


def test_describe_prints_every_parameter_layers_note_and_a_line_per_suspect_bias():
    params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
    params["bias"] = jnp.zeros(4)

    def apply_fn(p, x):
        h = jnp.tanh(x @ p["a"]["kernel"] + p["bias"])
        return h @ p["b"]["kernel"] + p["bias"]

    table = kfax.describe(apply_fn, params, jnp.ones((2, 3)))
    lines = table.splitlines()
    assert "  bias: used by the bias of 2 dense operations (shared: tied or reused)" in lines
    assert lines[4].split() == [
        "bias",
        "parameter",
        "1",
        "4",
        "1",
        "no",
        "diagonal",
        "-",
        "4(diag)",
    ]
    suspects = [line for line in lines if line.startswith("Suspect bias: bias ")]
    assert len(suspects) == 2
    assert "layer 'a'" in suspects[0] and "layer 'b'" in suspects[1]
    assert "bias gets a block of its own" in suspects[0]


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


def test_describe_marks_stacked_blocks_and_diagonal_sides_of_wide_layers():
    """A scan over 3 stacked layers gets ``factored[3]``; with ``max_factor_size=4`` a 5-wide
    input side is diagonal (the one-sided block) and the 3-wide output side stays dense."""
    stacked = {"W": jnp.ones((3, 4, 4)), "b": jnp.zeros((3, 4))}

    def scanned(p, x):
        return jax.lax.scan(lambda h, wb: (jnp.tanh(h @ wb[0] + wb[1]), None), x, (p["W"], p["b"]))[
            0
        ]

    row = kfax.describe(scanned, stacked, jnp.ones((2, 4))).splitlines()[2].split()
    assert row == ["W", "dense", "4", "4", "1", "yes", "factored[3]", "4^2", "4^2"]
    params, apply_fn, inputs, _ = models.mlp(sizes=(5, 3), bias=False)
    row = kfax.describe(apply_fn, params, inputs, max_factor_size=4).splitlines()[2].split()
    assert row[6:] == ["one_sided", "5(diag)", "3^2"]
    assert kfax.describe(apply_fn, params, inputs).splitlines()[2].split()[6:] == [
        "factored",
        "5^2",
        "3^2",
    ]
