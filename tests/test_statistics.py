"""Masked positions in the curvature statistics (issue 15, item 1), against dense references.

Convention under test (``kfax/statistics.py``, ``kfax/curvature.py``): with position weights
``kappa`` (``where`` x [label != ignore_index] x probability row mass), a layer's Kronecker
factors are the masked loss's own K-FAC-expand factors:

* ``A``: the mean (or, centred, the covariance) of ``h`` over the rows whose position weight is
  non-zero;
* ``B``: ``(1/N) sum_n sum_t J_nt^T D_n J_nt`` with ``J_nt = d f_n / d a_nt`` and ``D_n`` the
  Hessian of the masked per-example loss (``exact``), or ``(1/N) sum_n sum_t g_nt g_nt^T`` with
  ``g_nt`` the gradient of the masked per-example loss with respect to ``a_nt`` (``empirical``).

Every reference here is built from the models and losses written out by hand in this file:
per-example Jacobians from ``jax.jacfwd`` of the model with respect to a layer's
pre-activation, ``jax.hessian`` / ``jax.grad`` of the hand-written masked per-example loss, row
selection by hand. Nothing from ``kfax.exact`` or kfax's loss methods enters a reference. All
checks run in float64.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import kfax
from kfax.losses import SoftmaxCrossEntropy, SquaredError

IGNORE = -100
N, T, D_IN, HIDDEN, CLASSES = 3, 5, 3, 5, 4
VARIANCE = 0.7
MC_SAMPLES = 2000
SIGMAS = 6.0  # MC tolerance, in standard deviations of the sampled factor (computed exactly)


@pytest.fixture(scope="module", autouse=True)
def float64():
    """The whole module runs in float64 (module-scoped fixtures build float64 arrays)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


# ------------------------------------------------------------------------------ models by hand


def normal(seed, shape):
    """Data from numpy's generator (no per-shape compilation), as a float64 JAX array."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def integers(seed, shape, high=CLASSES):
    return jnp.asarray(np.random.default_rng(seed).integers(0, high, shape))


def init_params(seed, sizes):
    params = {}
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"dense_{i}"] = {
            "kernel": normal((seed, i, 0), (d_in, d_out)) / math.sqrt(d_in),
            "bias": 0.3 * normal((seed, i, 1), (d_out,)),
        }
    return params


def sequence_mlp(params, x):
    """Position-wise two-layer tanh MLP: ``(N, T, d) -> (N, T, C)``."""
    hidden = jnp.tanh(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    return hidden @ params["dense_1"]["kernel"] + params["dense_1"]["bias"]


def pooled_mlp(params, x):
    """Mean-pools over the sequence before its last layer: ``(N, T, d) -> (N, C)``."""
    hidden = jnp.tanh(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    return jnp.mean(hidden, axis=1) @ params["dense_1"]["kernel"] + params["dense_1"]["bias"]


def pooled_positions_mlp(params, x):
    """Pools over T, then one dense layer to ``P`` output positions: ``(N, T, d) -> (N, P, C)``."""
    flat = pooled_mlp(params, x)
    return flat.reshape(flat.shape[0], -1, CLASSES)


@functools.partial(jax.jit, static_argnums=(2, 3))
def layer_reference(params, x, model, layer):
    """Layer ``layer``'s input ``h``, written out by hand, and the per-example Jacobians
    ``J[n, o, r, i] = d f_n[o] / d a_n[r, i]`` of the outputs with respect to its
    pre-activation ``a`` (``jax.jacfwd``; outputs and rows of ``a`` flattened).

    ``model``: ``"sequence"`` (:func:`sequence_mlp`), ``"pooled"`` (:func:`pooled_mlp`) or
    ``"pooled-positions"`` (:func:`pooled_positions_mlp`)."""
    k0, b0 = params["dense_0"]["kernel"], params["dense_0"]["bias"]
    k1, b1 = params["dense_1"]["kernel"], params["dense_1"]["bias"]

    def hidden(a_n):  # one example's first pre-activation -> the last layer's input
        z = jnp.tanh(a_n)
        return z if model == "sequence" else jnp.mean(z, axis=0)

    if layer == 0:
        h, a = x, x @ k0 + b0

        def rest(a_n):
            return hidden(a_n) @ k1 + b1

    else:
        h = jax.vmap(hidden)(x @ k0 + b0)
        a = h @ k1 + b1

        def rest(a_n):
            return a_n  # the outputs (flattened for pooled-positions)

    jac = jax.vmap(jax.jacfwd(rest))(a)
    rows = math.prod(a.shape[1:-1])
    return h, jac.reshape(a.shape[0], -1, rows, a.shape[-1])


# ------------------------------------------------------------------------------ losses by hand


def log_softmax(f):
    return f - jax.scipy.special.logsumexp(f)


def label_nll(f, y):
    """``-log p_y``; the label is clipped so that ignored positions (weight 0) stay finite."""
    return -log_softmax(f)[jnp.clip(y, 0, f.shape[0] - 1)]


def probability_nll(f, y):
    """``-sum_c y_c log p_c``: the row mass is part of the loss (an all-zero row gives 0)."""
    return -jnp.sum(y * log_softmax(f))


def squared(f, y):
    return jnp.sum((f - y) ** 2) / (2 * VARIANCE)


@functools.cache
def masked_example_loss(position_loss):
    """``(f_n, y_n, w_n) -> sum_r w_nr l(f_nr, y_nr)`` for one example (any position shape)."""

    def loss(f, y, w):
        f2 = f.reshape(-1, f.shape[-1])
        y2 = y.reshape(f2.shape[0], *y.shape[w.ndim :])
        return jnp.sum(w.reshape(-1) * jax.vmap(position_loss)(f2, y2))

    return loss


# ------------------------------------------------------------------------------ references


def reference_a(h, row_weights, centering):
    """``A`` and ``E[h]`` over the rows of ``h``, row ``r`` weighted by ``row_weights[r]``
    (0/1: the mean over the rows that count)."""
    rows = np.asarray(h).reshape(-1, h.shape[-1])
    w = np.asarray(row_weights, np.float64).reshape(-1)
    mean = w @ rows / w.sum()
    if centering == "exact":
        centred = rows - mean
        return (centred * w[:, None]).T @ centred / w.sum(), mean
    hom = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
    return (hom * w[:, None]).T @ hom / w.sum(), mean


@functools.partial(jax.jit, static_argnums=(0, 4))
def output_curvature(example_loss, outputs, targets, weights, kind):
    """Per example ``D_n`` over the flattened outputs: the Hessian of the masked per-example
    loss (``exact``) or ``u_n u_n^T`` with ``u_n`` its gradient (``empirical``)."""
    n = outputs.shape[0]
    if kind == "exact":
        return jax.vmap(jax.hessian(example_loss))(outputs, targets, weights).reshape(
            n, outputs[0].size, outputs[0].size
        )
    u = jax.vmap(jax.grad(example_loss))(outputs, targets, weights).reshape(n, -1)
    return jnp.einsum("no,np->nop", u, u)


def reference_b(jac, curvature):
    """K-FAC-expand: ``(1/N) sum_n sum_r J_nr^T D_n J_nr``."""
    return np.asarray(jnp.einsum("nori,nop,nprj->ij", jac, curvature, jac) / jac.shape[0])


def jitted_factors(apply_fn, loss, **options):
    """``kfax.kronecker_factors`` under ``jax.jit``, for models and shapes used once: one
    compilation instead of one per primitive and shape (the module's shared batch runs eagerly,
    where those are cached)."""
    return jax.jit(kfax.kronecker_factors(apply_fn, loss, **options))


def relative(x, y):
    return float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / np.linalg.norm(np.asarray(y)))


# ------------------------------------------------------------------------------ masked batches


def sequence_cases():
    """Five ways to mask or weight positions of one ``(N, T) = (3, 5)`` batch.

    Each case: kfax's loss, the targets and ``where`` passed to kfax, and for the reference the
    hand-written position loss, its multiplier ``weight`` (where x [not ignored]) and ``kappa``
    (weight x row mass; a row counts where it is non-zero). Padding: sequences of lengths 5, 3
    and 1, so 6 of the 15 positions are padded (issue 15's "15-position batch with 6 padded").
    """
    rng = np.random.default_rng(7)
    labels = jnp.asarray(rng.integers(0, CLASSES, (N, T)))
    real = np.arange(T)[None, :] < np.array([5, 3, 1])[:, None]
    random_mask = rng.random((N, T)) < 0.65
    random_mask[:, 0] = True
    float_weights = rng.choice([0.0, 0.3, 1.0, 2.5], (N, T))
    float_weights[:, 0] = 1.0
    mass = np.where(real, np.where(np.arange(T)[None, :] % 3 == 1, 0.5, 1.0), 0.0)
    logits = 2 * rng.standard_normal((N, T, CLASSES))
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) * mass[..., None]
    ignore_labels = jnp.where(real, labels, IGNORE)
    return {
        "ignore-index": dict(
            loss=SoftmaxCrossEntropy(ignore_index=IGNORE),
            targets=ignore_labels,
            where=None,
            position_loss=label_nll,
            weight=real * 1.0,
            kappa=real * 1.0,
        ),
        "zero-probability-rows": dict(
            loss=SoftmaxCrossEntropy(),
            targets=jnp.asarray(probabilities),
            where=None,
            position_loss=probability_nll,
            weight=np.ones((N, T)),
            kappa=mass,
        ),
        "bool-where": dict(
            loss=SoftmaxCrossEntropy(),
            targets=labels,
            where=jnp.asarray(random_mask),
            position_loss=label_nll,
            weight=random_mask * 1.0,
            kappa=random_mask * 1.0,
        ),
        "float-weights": dict(
            loss=SquaredError(variance=VARIANCE),
            targets=jnp.asarray(rng.standard_normal((N, T, CLASSES))),
            where=jnp.asarray(float_weights),
            position_loss=squared,
            weight=float_weights,
            kappa=float_weights,
        ),
        "ignore-index-and-float-weights": dict(
            loss=SoftmaxCrossEntropy(ignore_index=IGNORE),
            targets=ignore_labels,
            where=jnp.asarray(float_weights),
            position_loss=label_nll,
            weight=float_weights * real,
            kappa=float_weights * real,
        ),
    }


CASES = [
    "ignore-index",
    "zero-probability-rows",
    "bool-where",
    "float-weights",
    "ignore-index-and-float-weights",
]
LAYERS = ("dense_0", "dense_1")


@pytest.fixture(scope="module")
def sequence_batch(float64):
    params = init_params(1, (D_IN, HIDDEN, CLASSES))
    x = normal(2, (N, T, D_IN))
    return params, x, sequence_cases()


@pytest.fixture(scope="module")
def sequence_references(sequence_batch):
    """``{layer: (h, J)}`` and ``{(case, layer, kind): B}`` of the masked losses."""
    params, x, cases = sequence_batch
    outputs = sequence_mlp(params, x)
    layers = {name: layer_reference(params, x, "sequence", i) for i, name in enumerate(LAYERS)}
    b_refs = {}
    for name, case in cases.items():
        example_loss = masked_example_loss(case["position_loss"])
        for kind in ("exact", "empirical"):
            curvature = output_curvature(
                example_loss, outputs, case["targets"], jnp.asarray(case["weight"]), kind
            )
            for layer, (_, jac) in layers.items():
                b_refs[name, layer, kind] = reference_b(jac, curvature)
    return layers, b_refs


# ------------------------------------------------------------------------------ 1. factors


@pytest.mark.parametrize("centering", ["exact", "none"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
@pytest.mark.parametrize("case", CASES)
def test_exact_and_empirical_factors_are_the_masked_losses_own_k_fac_expand_factors(
    sequence_batch, sequence_references, case, kind, centering
):
    params, x, cases = sequence_batch
    layers, b_refs = sequence_references
    spec = cases[case]
    fn = kfax.kronecker_factors(sequence_mlp, spec["loss"], kind=kind, centering=centering)
    factors = fn(params, x, targets=spec["targets"], where=spec["where"])
    for layer, (h, _) in layers.items():
        a_ref, mean_ref = reference_a(h, spec["kappa"] != 0, centering)
        np.testing.assert_allclose(factors[layer].a, a_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(factors[layer].mean, mean_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(factors[layer].b, b_refs[case, layer, kind], rtol=0, atol=1e-12)


def monte_carlo_standard_error(spec, outputs, jac, samples):
    """The exact standard deviation (Frobenius norm) of a sampled ``B`` from ``samples`` draws.

    Per position the sampled cotangent is ``v = sqrt(kappa) J^T grad_f l(f, y~)``; positions and
    draws are independent, so ``E |B_mc - B|_F^2 = sum_pos (E|v|^4 - |E v v^T|_F^2) / (N^2
    samples)``: ``E|v|^4`` is a sum over the classes for a categorical, and ``tr(S)^2 + 2
    |S|_F^2`` (``S = E v v^T``) for a Gaussian.
    """
    # Position-wise model: the Jacobian of position t's outputs with respect to position t.
    jac = jnp.einsum("ntctj->ntcj", jac.reshape(N, T, CLASSES, T, -1))
    kappa = jnp.asarray(spec["kappa"])
    if isinstance(spec["loss"], SquaredError):
        cov = jnp.einsum("ntci,ntcj->ntij", jac, jac) * (kappa / VARIANCE)[..., None, None]
        frobenius2 = jnp.sum(cov**2, axis=(-1, -2))
        variance = jnp.einsum("ntii->nt", cov) ** 2 + frobenius2
    else:
        p = jax.nn.softmax(outputs, axis=-1)
        residual = p[..., None, :] - jnp.eye(CLASSES)  # (N, T, class drawn, C)
        v = jnp.einsum("ntci,ntkc->ntki", jac, residual) * jnp.sqrt(kappa)[..., None, None]
        fourth = jnp.sum(p * jnp.sum(v**2, axis=-1) ** 2, axis=-1)
        cov = jnp.einsum("ntk,ntki,ntkj->ntij", p, v, v)
        variance = fourth - jnp.sum(cov**2, axis=(-1, -2))
    return float(jnp.sqrt(jnp.sum(variance) / (N**2 * samples)))


@pytest.mark.parametrize("case", CASES)
def test_monte_carlo_factors_approach_the_masked_exact_factors_with_many_samples(
    sequence_batch, sequence_references, case
):
    """2000 samples, fixed key: ``|B_mc - B_exact|_F <= 6 sigma``, ``sigma`` the sampled
    factor's exact standard deviation (``~ 1/sqrt(samples)``; observed errors are 0.4 to 1.7
    sigma over seeds). The masked positions, counted at unit weight, would move ``B`` by more
    than 1.5x that tolerance (9 sigma): the check sees them."""
    params, x, cases = sequence_batch
    layers, b_refs = sequence_references
    spec = cases[case]
    fn = kfax.kronecker_factors(sequence_mlp, spec["loss"], kind="mc", samples=MC_SAMPLES)
    factors = fn(params, x, targets=spec["targets"], where=spec["where"], key=jax.random.key(3))
    outputs = sequence_mlp(params, x)
    squared_error = isinstance(spec["loss"], SquaredError)
    unit = masked_example_loss(squared if squared_error else label_nll)
    dummy = jnp.zeros((N, T, CLASSES) if squared_error else (N, T), outputs.dtype)
    if not squared_error:
        dummy = dummy.astype(jnp.int32)
    masked = jnp.asarray(spec["kappa"] == 0, outputs.dtype)
    masked_curvature = output_curvature(unit, outputs, dummy, masked, "exact")
    for layer, (h, jac) in layers.items():
        exact = b_refs[case, layer, "exact"]
        sigma = monte_carlo_standard_error(spec, outputs, jac, MC_SAMPLES)
        error = np.linalg.norm(np.asarray(factors[layer].b) - exact)
        assert error <= SIGMAS * sigma, (layer, error / sigma)
        leak = np.linalg.norm(reference_b(jac, masked_curvature))
        assert leak > 1.5 * SIGMAS * sigma, (layer, leak / sigma)
        a_ref, _ = reference_a(h, spec["kappa"] != 0, "exact")
        np.testing.assert_allclose(factors[layer].a, a_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["exact", "empirical", "mc"])
@pytest.mark.parametrize("case", CASES)
def test_factors_do_not_depend_on_what_masked_positions_hold(sequence_batch, case, kind):
    """Inputs (and, where the mask is not the label, targets) at masked positions replaced by
    large garbage: every factor is unchanged (for ``mc`` with the same key, the draws at the
    counted positions do not depend on the logits elsewhere)."""
    params, x, cases = sequence_batch
    spec = cases[case]
    masked = jnp.asarray(spec["kappa"] == 0)
    garbage_x = jnp.where(masked[..., None], 40.0 * jnp.cos(3 * x) + 7.0, x)
    targets = spec["targets"]
    if spec["where"] is not None and jnp.issubdtype(targets.dtype, jnp.integer):
        garbage_targets = jnp.where(masked & (targets >= 0), (targets + 1) % CLASSES, targets)
    elif isinstance(spec["loss"], SquaredError):
        garbage_targets = jnp.where(masked[..., None], 1e3, targets)
    else:
        garbage_targets = targets
    fn = kfax.kronecker_factors(sequence_mlp, spec["loss"], kind=kind, samples=MC_SAMPLES)
    key = jax.random.key(11)
    clean = fn(params, x, targets=targets, where=spec["where"], key=key)
    dirty = fn(params, garbage_x, targets=garbage_targets, where=spec["where"], key=key)
    for layer in LAYERS:
        for got, want in zip(dirty[layer], clean[layer], strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ 2. the issue


def test_issue_smallest_input_gives_the_factors_of_the_first_position_alone(float64):
    """Issue 15's input, labels [[1, -100]]: the masked loss's ``g g^T`` has trace 0.769 and its
    Gauss-Newton 0.491 (kfax reported 1.335 and 0.925); ``A`` is the first row's alone."""
    params = {"w": jnp.array([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0]]), "b": jnp.zeros(3)}

    def apply_fn(p, x):
        return x @ p["w"] + p["b"]

    x = jnp.array([[[1.0, 2.0], [-1.0, 0.5]]])
    labels = jnp.array([[1, IGNORE]])
    loss = SoftmaxCrossEntropy(ignore_index=IGNORE)
    f = apply_fn(params, x)[0, 0]
    gradient = jax.jit(jax.grad(label_nll))(f, 1)
    hom = jnp.array([1.0, 2.0, 1.0])  # [h; 1] of the first position
    for kind, b_ref, trace in [
        ("exact", jax.jit(jax.hessian(label_nll))(f, 1), 0.491),
        ("empirical", jnp.outer(gradient, gradient), 0.769),
    ]:
        factors = jitted_factors(apply_fn, loss, kind=kind, centering="none")(
            params, x, targets=labels
        )["w"]
        np.testing.assert_allclose(factors.b, b_ref, rtol=0, atol=1e-12)
        assert round(float(jnp.trace(factors.b)), 3) == trace
        np.testing.assert_allclose(factors.a, jnp.outer(hom, hom), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_fifteen_positions_six_padded_unmasked_factors_are_far_off_masked_ones_exact(
    sequence_batch, sequence_references, kind
):
    """3 sequences of lengths 5, 3, 1: 6 of 15 positions padded with -100. The factors that
    count the padded positions (kfax before the fix: the Hessian and ``p - onehot(-100) = p``
    there, every row in ``A``) differ from the masked loss's by more than 10%; kfax's masked
    ones match the masked reference to 1e-12, for both layers and both factors."""
    params, x, cases = sequence_batch
    layers, b_refs = sequence_references
    spec = cases["ignore-index"]
    labels = spec["targets"]
    assert int(np.sum(np.asarray(labels) == IGNORE)) == 6
    outputs = sequence_mlp(params, x)
    if kind == "exact":  # the Hessian of -log p_y does not depend on y
        today = output_curvature(
            masked_example_loss(label_nll), outputs, labels, jnp.ones((N, T)), "exact"
        )
    else:
        u = (jax.nn.softmax(outputs) - jax.nn.one_hot(labels, CLASSES)).reshape(N, -1)
        today = jnp.einsum("no,np->nop", u, u)
    factors = kfax.kronecker_factors(sequence_mlp, spec["loss"], kind=kind)(
        params, x, targets=labels
    )
    for layer, (h, jac) in layers.items():
        a_masked, _ = reference_a(h, spec["kappa"] != 0, "exact")
        b_masked = b_refs["ignore-index", layer, kind]
        a_today, _ = reference_a(h, np.ones((N, T)), "exact")
        b_today = reference_b(jac, today)
        assert relative(b_today, b_masked) > 0.1, (layer, relative(b_today, b_masked))
        assert relative(a_today, a_masked) > 0.1, (layer, relative(a_today, a_masked))
        np.testing.assert_allclose(factors[layer].a, a_masked, rtol=0, atol=1e-12)
        np.testing.assert_allclose(factors[layer].b, b_masked, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ 3. pooled layers


@pytest.mark.parametrize("centering", ["exact", "none"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_rows_of_a_pooled_layer_count_where_their_examples_weight_is_non_zero(
    sequence_batch, kind, centering
):
    """Mean-pooling over T before the last layer: outputs ``(N, C)``, ``where`` of shape
    ``(N,)``. All ``T`` rows of example ``n`` of the first layer (and its one row of the last)
    count iff ``where[n] != 0``; ``B`` is the masked loss's ``(1/N) sum_n sum_t J_nt^T D_n
    J_nt``."""
    params, x, _ = sequence_batch
    labels = integers(10, (N,))
    where = jnp.array([1.0, 0.0, 0.4])
    outputs = pooled_mlp(params, x)
    curvature = output_curvature(masked_example_loss(label_nll), outputs, labels, where, kind)
    fn = jitted_factors(pooled_mlp, SoftmaxCrossEntropy(), kind=kind, centering=centering)
    factors = fn(params, x, targets=labels, where=where)
    counts = np.asarray(where != 0)
    for i, rows in enumerate([np.repeat(counts[:, None], T, axis=1), counts]):
        h, jac = layer_reference(params, x, "pooled", i)
        a_ref, mean_ref = reference_a(h, rows, centering)
        np.testing.assert_allclose(factors[LAYERS[i]].a, a_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(factors[LAYERS[i]].mean, mean_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            factors[LAYERS[i]].b, reference_b(jac, curvature), rtol=0, atol=1e-12
        )


def test_rows_of_a_layer_with_other_positions_weigh_by_their_examples_counted_fraction(
    float64,
):
    """Pooled over T, then one dense layer to P = 3 output positions (outputs ``(N, P, C)``,
    ``where`` ``(N, P)``): the layers' rows do not map onto the output's positions, and each row
    of example ``n`` weighs the fraction of example ``n``'s output positions that count (the
    documented convention of ``LayerCapture.row_weights``), in float64."""
    positions = 3
    params = init_params(12, (D_IN, HIDDEN, positions * CLASSES))
    x = normal(13, (N, T, D_IN))
    labels = integers(14, (N, positions))
    mask = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 1]], bool)
    outputs = pooled_positions_mlp(params, x)
    curvature = output_curvature(
        masked_example_loss(label_nll), outputs, labels, jnp.asarray(mask * 1.0), "exact"
    )
    fn = jitted_factors(pooled_positions_mlp, SoftmaxCrossEntropy(), kind="exact")
    factors = fn(params, x, targets=labels, where=jnp.asarray(mask))
    fraction = mask.mean(axis=1)
    for i, rows in enumerate([np.repeat(fraction[:, None], T, axis=1), fraction]):
        h, jac = layer_reference(params, x, "pooled-positions", i)
        a_ref, _ = reference_a(h, rows, "exact")
        np.testing.assert_allclose(factors[LAYERS[i]].a, a_ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            factors[LAYERS[i]].b, reference_b(jac, curvature), rtol=0, atol=1e-12
        )


# ------------------------------------------------------------------------------ 4. the steps


def linear(params, x):
    return x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"]


def test_adaptive_step_uses_the_masked_losses_quadratic_model(sequence_batch):
    """Linear model over a sequence, squared error, float weights with zeros and huge targets
    at the masked positions: the masked loss is quadratic, so rho = 1; the predicted change is
    the masked loss's undamped model ``g.d + d^T G d / 2`` (``G`` from ``jax.jacfwd``), far
    from the unmasked loss's; the gradient scale is 1 for the masked loss's gradient."""
    _, x, cases = sequence_batch
    params = init_params(20, (D_IN, CLASSES))
    where = cases["float-weights"]["where"]
    targets = jnp.where(where[..., None] == 0, 30.0, normal(22, (N, T, CLASSES)))
    example_loss = masked_example_loss(squared)

    @jax.jit
    @jax.grad
    def masked_gradient(p, w):
        return jnp.mean(jax.vmap(example_loss)(linear(p, x), targets, w))

    @jax.jit
    def gauss_newton(p, w):
        flat, unravel = ravel_pytree(p)
        jac = jax.jacfwd(lambda q: linear(unravel(q), x).ravel())(flat)
        scale = jnp.repeat(w.ravel(), CLASSES) / (VARIANCE * N)
        return jac.T @ (scale[:, None] * jac)

    opt = kfax.kfac(
        None,
        linear,
        SquaredError(VARIANCE),
        example_inputs=x,
        damping=1e-2,
        kind="exact",
        damping_every=1,
    )
    state = opt.init(params)
    ones = jnp.ones((N, T))
    for step in range(3):
        grads = masked_gradient(params, where)
        updates, state = opt.update(grads, state, params, inputs=x, targets=targets, where=where)
        g, d = ravel_pytree(grads)[0], ravel_pytree(updates)[0]
        predicted = g @ d + 0.5 * d @ gauss_newton(params, where) @ d
        np.testing.assert_allclose(state.info.predicted_change, predicted, rtol=1e-9)
        assert int(state.info.ratio_step) == step
        np.testing.assert_allclose(state.info.reduction_ratio, 1.0, rtol=1e-8)
        np.testing.assert_allclose(state.info.gradient_scale, 1.0, rtol=1e-8)
        g_all = ravel_pytree(masked_gradient(params, ones))[0]
        unmasked = g_all @ d + 0.5 * d @ gauss_newton(params, ones) @ d
        assert abs(float(unmasked - predicted)) > 0.1 * abs(float(predicted))
        params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("centering", ["exact", "none"])
def test_eigen_step_with_a_mask_is_the_dense_solve_with_the_masked_factors(
    sequence_batch, centering
):
    """One dense layer over a sequence, ignored labels and float weights: the step of
    ``scale_by_kfac(kind="exact", ema_decay=0, inverse_every=1, block="eigen")`` is
    ``(A (x) B + lam P)^{-1} vec([dK; db])`` with the masked factors built here: ``A`` the
    homogeneous second moment over the counted rows, ``B = (1/N) sum_nt D_nt``, ``P = I``
    (``"none"``) or ``L L^T (x) I`` with ``L = [[I, m], [0, 1]]`` and ``m`` the counted rows'
    mean (``"exact"``, the default; ``kfax/blocks/eigen.py``)."""
    lam = 1e-2
    _, x, cases = sequence_batch
    params = init_params(30, (D_IN, CLASSES))
    spec = cases["ignore-index-and-float-weights"]
    targets, where, weight = spec["targets"], spec["where"], jnp.asarray(spec["weight"])
    example_loss = masked_example_loss(label_nll)
    grads = jax.jit(
        jax.grad(lambda p: jnp.mean(jax.vmap(example_loss)(linear(p, x), targets, weight)))
    )(params)
    hessians = output_curvature(example_loss, linear(params, x), targets, weight, "exact")
    hessians = hessians.reshape(N, T, CLASSES, T, CLASSES)
    b = np.asarray(jnp.einsum("ntcsd,ts->cd", hessians, jnp.eye(T)) / N)
    a_hom, mean = reference_a(x, spec["kappa"] != 0, "none")
    if centering == "none":
        penalty = np.eye((D_IN + 1) * CLASSES)
    else:
        lower = np.eye(D_IN + 1)
        lower[:D_IN, D_IN] = mean
        penalty = np.kron(lower @ lower.T, np.eye(CLASSES))
    vector = np.concatenate(
        [np.asarray(grads["dense_0"]["kernel"]).ravel(), np.asarray(grads["dense_0"]["bias"])]
    )
    solution = np.linalg.solve(np.kron(a_hom, b) + lam * penalty, vector)

    opt = kfax.scale_by_kfac(
        linear,
        spec["loss"],
        example_inputs=x,
        damping=lam,
        block="eigen",
        centering=centering,
        kind="exact",
        ema_decay=0.0,
        inverse_every=1,
    )
    updates, _ = opt.update(grads, opt.init(params), params, inputs=x, targets=targets, where=where)
    np.testing.assert_allclose(
        updates["dense_0"]["kernel"], solution[:-CLASSES].reshape(D_IN, CLASSES), atol=1e-10
    )
    np.testing.assert_allclose(updates["dense_0"]["bias"], solution[-CLASSES:], atol=1e-10)


# ------------------------------------------------------------------------------ 5. bad input


def _ignore_problem(sequence_batch):
    params, x, cases = sequence_batch
    spec = cases["ignore-index"]
    loss, labels = spec["loss"], spec["targets"]
    grads = jax.tree.map(jnp.ones_like, params)  # any gradient: the errors come first
    return params, x, labels, loss, grads


@pytest.mark.parametrize("kind", ["exact", "mc"])
def test_a_loss_with_ignore_index_and_no_targets_is_an_error_naming_targets(sequence_batch, kind):
    params, x, _, loss, grads = _ignore_problem(sequence_batch)
    fn = kfax.kronecker_factors(sequence_mlp, loss, kind=kind)
    with pytest.raises(ValueError, match="targets"):
        fn(params, x, key=jax.random.key(0))
    opt = kfax.scale_by_kfac(sequence_mlp, loss, example_inputs=x, kind=kind)
    with pytest.raises(ValueError, match="targets"):
        opt.update(grads, opt.init(params), params, inputs=x)


@pytest.mark.parametrize("shape", [(N,), (N, T - 1), (N, T, CLASSES)])
def test_where_of_the_wrong_shape_is_an_error_naming_where(sequence_batch, shape):
    params, x, labels, loss, grads = _ignore_problem(sequence_batch)
    where = jnp.ones(shape, bool)
    for kind in ("exact", "empirical"):
        fn = kfax.kronecker_factors(sequence_mlp, loss, kind=kind)
        with pytest.raises(ValueError, match="where"):
            fn(params, x, targets=labels, where=where)
    opt = kfax.scale_by_kfac(sequence_mlp, loss, example_inputs=x, kind="exact")
    with pytest.raises(ValueError, match="where"):
        opt.update(grads, opt.init(params), params, inputs=x, targets=labels, where=where)
