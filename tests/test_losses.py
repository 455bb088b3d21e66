"""Output distributions against float64 references built here from hand-written per-position losses.

Convention under test (kfax/losses/): ``per_example_n = sum_r kappa_nr l(f_nr, y_nr)`` with
``kappa = where x [label != ignore_index] x row mass``; gradient, curvature root, curvature
product and sampled cotangents are all weighted by the same ``kappa``.
"""

import doctest
import functools
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from kfax.losses import SigmoidCrossEntropy, SoftmaxCrossEntropy, SquaredError, check_loss

IGNORE = -100
VARIANCE = 0.5
SHAPES = [(5, 4), (2, 2, 3, 3)]


# Hand-written losses of one position: f and y of shape (event,) (an integer label for softmax).
def _log_p(f):
    return f - jnp.log(jnp.sum(jnp.exp(f - jnp.max(f)))) - jnp.max(f)


def label_loss(f, y):
    """-log p_y; the label is clipped so that ignored positions (weight 0) stay finite."""
    return -_log_p(f)[jnp.clip(y, 0, f.shape[0] - 1)]


def probability_loss(f, y):
    """-sum_c (y_c / s) log p_c; an all-zero row has weight s = 0."""
    mass = jnp.sum(y)
    return -jnp.sum(y / jnp.where(mass == 0, 1.0, mass) * _log_p(f))


def sigmoid_loss(f, y):
    return jnp.sum(jnp.logaddexp(0.0, f) - y * f)


def squared_loss(f, y):
    return jnp.sum((f - y) ** 2) / (2 * VARIANCE)


CASES = {
    "labels-ignore": (SoftmaxCrossEntropy(IGNORE), label_loss),
    "zero-rows": (SoftmaxCrossEntropy(), probability_loss),
    "labels-bool-where": (SoftmaxCrossEntropy(), label_loss),
    "labels-ignore-float-weights": (SoftmaxCrossEntropy(IGNORE), label_loss),
    "sigmoid-bool-where": (SigmoidCrossEntropy(), sigmoid_loss),
    "sigmoid-float-weights": (SigmoidCrossEntropy(), sigmoid_loss),
    "squared-float-weights": (SquaredError(VARIANCE), squared_loss),
    "squared-no-where": (SquaredError(VARIANCE), squared_loss),
}


def make_case(name, shape):
    """(loss, outputs, targets, where, hand-written per-position loss, hand-written kappa)."""
    loss, hand = CASES[name]
    outputs, targets, where, kappa = case_arrays(name, shape)
    return loss, outputs, targets, where, hand, kappa


@functools.partial(jax.jit, static_argnums=(0, 1))
def case_arrays(name, shape):
    """Outputs, targets, where and kappa (by hand); masked positions in every shape."""
    positions, classes = shape[:-1], shape[-1]
    outputs = 2 * jax.random.normal(jax.random.key(0), shape)
    index = jnp.arange(np.prod(positions)).reshape(positions)
    pad = index % 3 == 1
    labels = jax.random.randint(jax.random.key(1), positions, 0, classes)
    soft = jax.random.uniform(jax.random.key(2), shape)
    weights = jax.random.uniform(jax.random.key(3), positions, minval=0.1, maxval=2.0)
    weights = jnp.where(index % 4 == 2, 0.0, weights)
    padded = jnp.where(pad, IGNORE, labels)
    if name == "labels-ignore":
        return outputs, padded, None, 1.0 * (padded != IGNORE)
    if name == "zero-rows":
        mass = jnp.where(pad, 0.0, jnp.where(index % 3 == 2, 0.5, 1.0))
        y = jax.nn.softmax(3 * soft) * mass[..., None]
        return outputs, y, None, jnp.sum(y, -1)
    if name == "labels-bool-where":
        return outputs, labels, ~pad, 1.0 * ~pad
    if name == "labels-ignore-float-weights":
        return outputs, padded, weights, weights * (padded != IGNORE)
    if name == "sigmoid-bool-where":
        return outputs, soft, ~pad, 1.0 * ~pad
    if name in ("sigmoid-float-weights", "squared-float-weights"):
        return outputs, soft, weights, weights
    assert name == "squared-no-where"
    return outputs, soft, None, jnp.ones(positions)


def per_position(fn, f, y):
    """``fn`` of each position: f (batch, *positions, event) -> (batch, *positions, ...)."""
    positions, event = f.shape[:-1], f.shape[-1]
    y_flat = y.reshape(-1) if y.shape == positions else y.reshape(-1, event)
    out = jax.vmap(fn)(f.reshape(-1, event), y_flat)
    return out.reshape(positions + out.shape[1:])


@functools.partial(jax.jit, static_argnums=0)
def reference_per_example(hand, kappa, f, y):
    """sum_r kappa_r l(f_r, y_r) per example."""
    return jnp.sum((kappa * per_position(hand, f, y)).reshape(f.shape[0], -1), axis=1)


@functools.partial(jax.jit, static_argnums=0)
def reference_hessian(hand, kappa, f, y):
    """kappa * d2l/df2 per position: (batch, *positions, event, event)."""
    return kappa[..., None, None] * per_position(jax.hessian(hand), f, y)


def block_diagonal(blocks):
    """(batch, *positions, E, E) -> the per-example (P E, P E) matrix, block diagonal."""
    n, e = blocks.shape[0], blocks.shape[-1]
    blocks = blocks.reshape(n, -1, e, e)
    full = jnp.einsum("rq,nrij->nriqj", jnp.eye(blocks.shape[1]), blocks)
    return full.reshape(n, blocks.shape[1] * e, blocks.shape[1] * e)


def masked(kappa, x):
    """The entries of x (batch, *positions, ...) at positions of weight 0."""
    return np.asarray(x)[np.asarray(kappa) == 0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", CASES)
def test_value_weights_and_gradient_match_the_hand_written_masked_loss(x64, name, shape):
    loss, f, y, where, hand, kappa = make_case(name, shape)
    np.testing.assert_allclose(loss.position_weights(f, y, where=where), kappa, rtol=1e-15)
    assert loss.position_weights(f, y, where=where).dtype == f.dtype

    expected = reference_per_example(hand, kappa, f, y)
    np.testing.assert_allclose(loss.per_example(f, y, where=where), expected, rtol=1e-13)
    np.testing.assert_allclose(loss(f, y, where=where), jnp.mean(expected), rtol=1e-13)
    gradient = loss.output_gradient(f, y, where=where)
    reference = jax.grad(lambda f: jnp.sum(reference_per_example(hand, kappa, f, y)))(f)
    np.testing.assert_allclose(gradient, reference, atol=1e-13)
    assert np.all(masked(kappa, gradient) == 0)
    assert masked(kappa, gradient).size > 0 or where is None and name.startswith("squared")
    own = jax.grad(lambda f: jnp.sum(loss.per_example(f, y, where=where)))(f)
    np.testing.assert_allclose(gradient, own, atol=1e-13)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", CASES)
def test_curvature_sqrt_and_product_are_the_weighted_per_position_hessian(x64, name, shape):
    loss, f, y, where, hand, kappa = make_case(name, shape)
    weights = loss.position_weights(f, y, where=where)
    hessian = reference_hessian(hand, kappa, f, y)
    cols = loss.curvature_sqrt(f, weights)
    assert cols.shape[1:] == f.shape
    flat = cols.reshape(cols.shape[0], f.shape[0], -1)
    squared = jnp.einsum("kna,knb->nab", flat, flat)
    np.testing.assert_allclose(squared, block_diagonal(hessian), atol=1e-13)
    assert np.all(masked(kappa, jnp.moveaxis(cols, 0, -2)) == 0)
    tangent = jax.random.normal(jax.random.key(7), f.shape)
    product = loss.curvature_product(f, tangent, weights)
    np.testing.assert_allclose(
        product, jnp.einsum("...ij,...j->...i", hessian, tangent), atol=1e-13
    )
    assert np.all(masked(kappa, product) == 0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", [c for c in CASES if isinstance(CASES[c][0], SoftmaxCrossEntropy)])
def test_softmax_fisher_identity_by_enumerating_the_classes(x64, name, shape):
    """E[u u^T] = sum_c p_c u(c) u(c)^T = kappa H per position; E[u] = 0 (positions independent)."""
    loss, f, y, where, hand, kappa = make_case(name, shape)
    weights = loss.position_weights(f, y, where=where)
    p = jnp.exp(per_position(lambda f, _: _log_p(f), f, f))
    us = [loss._cotangent(f, jnp.full(f.shape[:-1], c), weights) for c in range(f.shape[-1])]
    fisher = sum(
        p[..., c, None, None] * u[..., :, None] * u[..., None, :] for c, u in enumerate(us)
    )
    np.testing.assert_allclose(fisher, reference_hessian(hand, kappa, f, y), atol=1e-13)
    np.testing.assert_allclose(sum(p[..., c, None] * u for c, u in enumerate(us)), 0, atol=1e-13)
    key = jax.random.key(5)
    sampled = loss._cotangent(f, loss.sample(key, f), weights)
    np.testing.assert_array_equal(loss.sampled_cotangent(key, f, weights), sampled)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["squared-float-weights", "squared-no-where"])
def test_squared_error_fisher_identity_from_the_gaussian_closed_form(x64, name, shape):
    """u = A y~ + b is affine in y~ ~ N(f, variance I): E[u u^T] = variance A A^T + u(f) u(f)^T."""
    loss, f, y, where, hand, kappa = make_case(name, shape)
    weights = loss.position_weights(f, y, where=where)
    n = f.shape[0]
    jac = jax.jacfwd(lambda t: loss._cotangent(f, t, weights))(f).reshape(n, -1, n, f[0].size)
    jac = jnp.einsum("nanb->nab", jac)  # each example's own block (examples are independent)
    mean = loss._cotangent(f, f, weights).reshape(n, -1)
    fisher = VARIANCE * jac @ jnp.swapaxes(jac, 1, 2) + mean[:, :, None] * mean[:, None, :]
    np.testing.assert_allclose(
        fisher, block_diagonal(reference_hessian(hand, kappa, f, y)), atol=1e-13
    )
    key = jax.random.key(5)
    sampled = loss._cotangent(f, loss.sample(key, f), weights)
    np.testing.assert_array_equal(loss.sampled_cotangent(key, f, weights), sampled)


@pytest.mark.parametrize("name", ["sigmoid-bool-where", "sigmoid-float-weights"])
def test_bernoulli_fisher_identity_within_five_standard_errors(x64, name):
    """Mean of u u^T over N = 20000 draws vs kappa H over whole examples (cross-position blocks 0).

    Each entry's exact standard deviation, with v = s (1 - s): sqrt(k_i k_j v_i v_j) off the
    diagonal, k_i sqrt(v_i) |1 - 2 s_i| on it; tolerance 5 sd / sqrt(N).
    """
    loss, f, y, where, hand, kappa = make_case(name, (2, 2, 3, 3))
    samples = 20000
    keys = jax.random.split(jax.random.key(11), samples)
    weights = loss.position_weights(f, y, where)
    us = jax.jit(jax.vmap(lambda k: loss.sampled_cotangent(k, f, weights)))(keys)
    us = us.reshape(samples, f.shape[0], -1)
    fisher = jnp.einsum("mna,mnb->nab", us, us) / samples
    s = 1 / (1 + jnp.exp(-f))
    v = (s * (1 - s)).reshape(f.shape[0], -1)
    k = jnp.broadcast_to(kappa[..., None], f.shape).reshape(f.shape[0], -1)
    sd = jnp.sqrt(k[:, :, None] * k[:, None, :] * v[:, :, None] * v[:, None, :])
    diagonal = k * jnp.sqrt(v) * jnp.abs(1 - 2 * s.reshape(f.shape[0], -1))
    sd = sd.at[:, jnp.arange(sd.shape[1]), jnp.arange(sd.shape[1])].set(diagonal)
    expected = block_diagonal(reference_hessian(hand, kappa, f, y))
    assert np.all(np.abs(fisher - expected) <= 5 * sd / np.sqrt(samples) + 1e-12)


def test_issue_example_padded_position_is_left_out_of_value_and_gradient(x64):
    inputs = jnp.array([[[1.0, 2.0], [-1.0, 0.5]]])
    w = jnp.array([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0]])
    outputs = inputs @ w
    labels = jnp.array([[1, IGNORE]])
    loss = SoftmaxCrossEntropy(ignore_index=IGNORE)
    first = -_log_p(outputs[0, 0])[1]
    assert np.isclose(float(loss(outputs, labels)), float(first), rtol=1e-15)
    assert round(float(loss(outputs, labels)), 4) == 0.9946
    gradient = loss.output_gradient(outputs, labels)
    np.testing.assert_array_equal(gradient[0, 1], 0.0)
    np.testing.assert_allclose(gradient[0, 0], jax.grad(lambda f: -_log_p(f)[1])(outputs[0, 0]))
    np.testing.assert_allclose(loss.position_weights(outputs, labels), [[1.0, 0.0]])


def test_probability_targets_value_matches_optax(x64):
    loss, f, y, *_ = make_case("zero-rows", (2, 2, 3, 3))
    expected = optax.losses.softmax_cross_entropy(f, y).sum(axis=(1, 2))
    np.testing.assert_allclose(loss.per_example(f, y), expected, rtol=1e-13)


def test_masked_positions_stay_exactly_zero_when_their_outputs_are_not_finite(x64):
    loss = SoftmaxCrossEntropy(IGNORE)
    f = jax.random.normal(jax.random.key(0), (2, 3, 4)).at[0, 1].set(jnp.nan).at[1, 2].set(jnp.inf)
    y = jnp.array([[0, IGNORE, 2], [3, 1, IGNORE]])
    kappa = loss.position_weights(f, y)
    assert np.all(np.isfinite(loss.per_example(f, y)))
    for array in (loss.output_gradient(f, y), jnp.moveaxis(loss.curvature_sqrt(f, kappa), 0, -2)):
        assert np.all(masked(kappa, array) == 0)
        assert np.all(np.isfinite(np.asarray(array)[np.asarray(kappa) != 0]))


def test_minus_infinity_logits_of_other_classes_keep_the_loss_finite(x64):
    f = jnp.array([[0.0, 1.0, -jnp.inf], [2.0, -jnp.inf, 0.5]])
    loss = SoftmaxCrossEntropy()
    for y in (jnp.array([1, 0]), jnp.eye(3)[jnp.array([1, 0])]):
        expected = [-_log_p(f[0])[1], -_log_p(f[1])[0]]
        np.testing.assert_allclose(loss.per_example(f, y), expected, rtol=1e-15)
        assert np.all(np.isfinite(loss.output_gradient(f, y)))


def test_out_of_range_labels_under_jit_give_nan_at_their_position_only(x64):
    f = jax.random.normal(jax.random.key(0), (3, 2, 4))
    y = jnp.array([[0, 7], [IGNORE, 1], [2, 3]])
    for loss in (SoftmaxCrossEntropy(IGNORE), SoftmaxCrossEntropy()):
        nan = np.array([[False, True], [loss.ignore_index is None, False], [False, False]])
        kappa = jax.jit(loss.position_weights)(f, y)
        np.testing.assert_array_equal(np.isnan(kappa), nan)
        np.testing.assert_array_equal(np.isnan(jax.jit(loss.per_example)(f, y)), nan.any(1))
        assert np.isnan(float(jax.jit(loss)(f, y)))
        gradient = jax.jit(loss.output_gradient)(f, y)
        np.testing.assert_array_equal(np.isnan(gradient).any(-1), nan)
        assert np.all(np.isnan(gradient)[nan])
        cols = jnp.moveaxis(jax.jit(loss.curvature_sqrt)(f, kappa), 0, -2)
        assert np.all(np.isnan(cols[nan].max(-1)))  # every column's entry at that position


def test_jit_matches_eager_with_masks(x64):
    loss, f, y, where, *_ = make_case("labels-ignore-float-weights", (2, 2, 3, 3))
    np.testing.assert_allclose(
        jax.jit(loss.per_example)(f, y, where), loss.per_example(f, y, where), rtol=1e-15
    )
    kappa = loss.position_weights(f, y, where)
    np.testing.assert_array_equal(jax.jit(loss.position_weights)(f, y, where), kappa)
    np.testing.assert_array_equal(
        jax.jit(loss.curvature_sqrt)(f, kappa), loss.curvature_sqrt(f, kappa)
    )


def test_position_weights_without_targets_and_dtypes():
    f = jnp.zeros((2, 3, 4), jnp.float32)
    where = jnp.array([[True, False, True], [False, True, True]])
    loss = SoftmaxCrossEntropy(IGNORE)
    np.testing.assert_array_equal(loss.position_weights(f), jnp.ones((2, 3)))
    np.testing.assert_array_equal(loss.position_weights(f, where=where), where)
    kappa = loss.position_weights(f, jnp.array([[1, 2, IGNORE], [0, 0, 0]]), where=where)
    np.testing.assert_array_equal(kappa, [[1, 0, 0], [0, 1, 1]])
    assert kappa.dtype == jnp.float32
    bf16 = SquaredError().position_weights(f.astype(jnp.bfloat16), where=where)
    assert bf16.dtype == jnp.bfloat16
    assert SigmoidCrossEntropy().per_example(f, jnp.ones(f.shape, bool), where=where).shape == (2,)


@pytest.mark.parametrize("shape", SHAPES)
def test_unweighted_methods_keep_todays_convention(x64, shape):
    """Without where/weights: gradient and curvature of each example's summed loss (as before)."""
    f = jax.random.normal(jax.random.key(0), shape)
    labels = jax.random.randint(jax.random.key(1), shape[:-1], 0, shape[-1])
    soft = jax.random.uniform(jax.random.key(2), shape)
    cases = [
        (SoftmaxCrossEntropy(), labels),
        (SoftmaxCrossEntropy(), jax.nn.softmax(3 * soft)),
        (SigmoidCrossEntropy(), soft),
        (SquaredError(variance=0.5), soft),
    ]
    n = shape[0]
    for loss, y in cases:
        one = jax.hessian(lambda f, y, lo=loss: lo.per_example(f[None], y[None])[0])
        hessian = jax.jit(jax.vmap(one))(f, y)
        hessian = hessian.reshape(n, f[0].size, f[0].size)
        flat = loss.curvature_sqrt(f).reshape(-1, n, f[0].size)
        np.testing.assert_allclose(jnp.einsum("kna,knb->nab", flat, flat), hessian, atol=1e-12)
        tangent = jax.random.normal(jax.random.key(7), shape).reshape(n, -1)
        product = loss.curvature_product(f, tangent.reshape(shape)).reshape(n, -1)
        np.testing.assert_allclose(product, jnp.einsum("nij,nj->ni", hessian, tangent), atol=1e-12)


def test_mean_loss_closed_forms():
    assert np.isclose(SoftmaxCrossEntropy()(jnp.zeros((2, 4)), jnp.array([0, 3])), np.log(4))
    assert np.isclose(SigmoidCrossEntropy()(jnp.zeros((2, 3)), jnp.ones((2, 3))), 3 * np.log(2))
    assert np.isclose(SquaredError(variance=2.0)(jnp.ones((2, 3)), jnp.zeros((2, 3))), 0.75)


def test_samples_follow_the_model_distribution():
    logits = jnp.array([[0.0, 1.0, -1.0]])
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.vmap(lambda k: SoftmaxCrossEntropy().sample(k, logits))(keys)[:, 0]
    freq = np.bincount(np.asarray(draws), minlength=3) / draws.size
    p = np.asarray(jax.nn.softmax(logits[0]))
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / draws.size))
    bern = jax.vmap(lambda k: SigmoidCrossEntropy().sample(k, logits))(keys)
    s = np.asarray(jax.nn.sigmoid(logits[0]))
    assert np.all(np.abs(bern.mean(0)[0] - s) < 4 * np.sqrt(s * (1 - s) / 20000))
    gauss = jax.vmap(lambda k: SquaredError(variance=4.0).sample(k, logits))(keys)
    assert abs(float((gauss - logits).mean())) < 4 * 2.0 / np.sqrt(gauss.size)
    assert abs(float((gauss - logits).std()) - 2.0) < 0.05


F = jnp.zeros((2, 3, 4))
LABELS = jnp.array([[0, 1, 2], [3, 0, 1]])


@pytest.mark.parametrize(
    ("loss", "targets", "message"),
    [
        (
            SoftmaxCrossEntropy(),
            jax.nn.one_hot(LABELS, 4, dtype=jnp.int32),
            r"targets of shape \(2, 3, 4\).*integer labels have shape outputs.shape\[:-1\] = "
            r"\(2, 3\).*one-hot targets must be floating probabilities",
        ),
        (SoftmaxCrossEntropy(), LABELS[:, :2], r"targets of shape \(2, 2\) do not match"),
        (SoftmaxCrossEntropy(), jnp.zeros((2, 3)), r"floating targets are probabilities.*integers"),
        (SoftmaxCrossEntropy(), jnp.zeros((2, 3, 4), bool), "targets must be integer labels or"),
        (SoftmaxCrossEntropy(), -jnp.ones((2, 3, 4)), "probability targets must be >= 0"),
        (
            SoftmaxCrossEntropy(),
            LABELS.at[1, 2].set(4),
            r"targets hold 1 label.*\[0, 4\).*\(1, 2\)",
        ),
        (SoftmaxCrossEntropy(), LABELS.at[0, 0].set(IGNORE), r"targets hold.*ignore_index is None"),
        (
            SoftmaxCrossEntropy(IGNORE),
            LABELS.at[0, 0].set(-1),
            r"targets hold.*-1 at index \(0, 0\)",
        ),
        (SigmoidCrossEntropy(), jnp.zeros((2, 3)), r"targets of shape \(2, 3\) do not match"),
        (SquaredError(), jnp.zeros((2, 3, 4), jnp.complex64), "targets must be real"),
    ],
)
def test_bad_targets_are_named_by_every_method(loss, targets, message):
    calls = [
        lambda: loss.check_targets(F, targets),
        lambda: loss(F, targets),
        lambda: loss.per_example(F, targets),
        lambda: loss.output_gradient(F, targets),
        lambda: loss.position_weights(F, targets),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call()


def test_valid_targets_pass_check_targets():
    assert SoftmaxCrossEntropy(IGNORE).check_targets(F, LABELS.at[0, 0].set(IGNORE)) is None
    SoftmaxCrossEntropy().check_targets(F, jnp.zeros((2, 3, 4)))
    SigmoidCrossEntropy().check_targets(F, jnp.ones((2, 3, 4), int))
    SquaredError().check_targets(F, np.ones((2, 3, 4)))


def test_bad_where_weights_and_options_are_named():
    loss = SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match=r"where must have shape outputs.shape\[:-1\] = \(2, 3\)"):
        loss(F, LABELS, where=jnp.ones((2, 3, 4), bool))
    with pytest.raises(ValueError, match=r"where must have shape.*got shape \(2,\)"):
        SquaredError().output_gradient(F, F, where=jnp.ones(2))
    with pytest.raises(ValueError, match="where must hold finite non-negative"):
        loss.position_weights(F, where=-jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="where must be a bool mask or real"):
        loss.per_example(F, LABELS, where=jnp.ones((2, 3), jnp.complex64))
    with pytest.raises(ValueError, match=r"weights must have shape outputs.shape\[:-1\]"):
        loss.curvature_sqrt(F, jnp.ones((2,)))
    with pytest.raises(ValueError, match="weights must have shape"):
        SigmoidCrossEntropy().sampled_cotangent(jax.random.key(0), F, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="tangent of shape"):
        loss.curvature_product(F, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="variance must be > 0"):
        SquaredError(variance=0.0)
    with pytest.raises(ValueError, match="ignore_index must be an int or None"):
        SoftmaxCrossEntropy(ignore_index=-100.0)
    with pytest.raises(ValueError, match="batch axis and an event axis"):
        SigmoidCrossEntropy()(jnp.zeros(3), jnp.zeros(3))


def test_check_loss_requires_the_whole_contract():
    for loss in (SoftmaxCrossEntropy(), SigmoidCrossEntropy(), SquaredError()):
        check_loss(loss)

    class Old:
        def per_example(self, f, y): ...

    with pytest.raises(TypeError, match="sampled_cotangent.*check_targets"):
        check_loss(Old())
    with pytest.raises(TypeError, match="output distribution"):
        check_loss(lambda f, y: 0.0)


# Docstring examples in kfax/losses.py before it became a package (13): the split loses none.
DOCTEST_FLOOR = 13


def test_docstring_examples_run():
    names = ["kfax.losses"] + [
        info.name for info in pkgutil.walk_packages(kfax.losses.__path__, prefix="kfax.losses.")
    ]
    attempted = 0
    for name in names:
        results = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
        assert results.failed == 0, name
        attempted += results.attempted
    assert attempted >= DOCTEST_FLOOR
