"""K-FAC as optax gradient transformations: :func:`scale_by_kfac` and the alias :func:`kfac`.

The state (:class:`KFACState`) holds everything between steps: step count, PRNG key, moving
averages of the raw layer moments, damped inverses or eigenbases, EKFAC scalings, the current
damping and, for the adaptive mode, the previous update. ``update`` is pure, so it runs under
``jit``, ``lax.scan``, ``optax.MultiSteps`` and ``optax.apply_if_finite``. Layer kinds are
invisible here: weights are handled as ``(d_in, d_out)`` matrices through their geometry.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfax import _capture, _linalg, _tracing
from kfax.curvature import (
    Moments,
    check_kind,
    check_samples,
    factors_from_moments,
    layer_moments,
    output_cotangents,
)
from kfax.losses import Loss, check_loss

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


class FactoredInverse(NamedTuple):
    """``(A + pi sqrt(lam) I)^{-1}`` and ``(B + sqrt(lam)/pi I)^{-1}`` of one layer."""

    a_inv: jax.Array
    b_inv: jax.Array


class EigenBasis(NamedTuple):
    """Eigenvectors and (clipped) eigenvalues of one layer's two factors."""

    q_a: jax.Array
    s_a: jax.Array
    q_b: jax.Array
    s_b: jax.Array


class StepInfo(NamedTuple):
    """Scalars worth logging, as chosen on the last step (NaN where not applicable)."""

    learning_rate: jax.Array
    momentum: jax.Array
    predicted_change: jax.Array
    reduction_ratio: jax.Array


class KFACState(NamedTuple):
    """State of :func:`scale_by_kfac`. Its structure is fixed when the transform is built.

    Attributes:
      count: number of updates so far.
      key: raw PRNG key (``uint32[2]``) for sampling targets.
      moments: per layer, unnormalised moving averages of ``E[h h^T]``, ``E[h]``, ``E[g g^T]``.
      moments_weight: the normaliser of those moving averages (bias correction).
      curvature: per layer, :class:`FactoredInverse` or :class:`EigenBasis`.
      scalings: per layer, unnormalised moving average of EKFAC's diagonal (``{}`` without EKFAC).
      scalings_weight: its normaliser; reset when eigenbases are refreshed.
      damping: the current damping ``lam``.
      previous_update: the last update (adaptive mode; ``()`` otherwise).
      unmatched: Adam moments ``(mu, nu)`` for parameters outside any layer (``()`` otherwise).
      nonfinite_count: statistics steps skipped because the batch statistics were not finite.
      info: :class:`StepInfo`.
    """

    count: jax.Array
    key: jax.Array
    moments: dict[str, Moments]
    moments_weight: jax.Array
    curvature: dict[str, Any]
    scalings: dict[str, jax.Array]
    scalings_weight: jax.Array
    damping: jax.Array
    previous_update: Any
    unmatched: Any
    nonfinite_count: jax.Array
    info: StepInfo


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if callable(value):
        return
    bound = ">= 0" if allow_zero else "> 0"
    if not _is_real(value):
        raise ValueError(f"{name} must be a number {bound} (or a schedule), got {value!r}.")
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be {bound}, got {value!r}.")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")


def _check_count(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _tree_vdot(a: Any, b: Any) -> jax.Array:
    parts = []
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        dtype = jnp.promote_types(jnp.promote_types(x.dtype, y.dtype), jnp.float32)
        parts.append(jnp.vdot(x.astype(dtype), y.astype(dtype)))
    return sum(parts[1:], parts[0])


def _all_finite(tree: Any) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def scale_by_kfac(
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    *,
    example_inputs: Any = None,
    damping: ScalarOrSchedule = 1e-3,
    damping_method: str = "factored",
    adaptive_damping: bool = False,
    kind: str = "mc",
    samples: int = 1,
    centered: bool = True,
    ema_decay: float = 0.95,
    stats_every: int = 1,
    inverse_every: int = 10,
    stats_batch_size: int | None = None,
    eigen_correction: bool = False,
    bias_update: str = "exact",
    norm_constraint: float | None = None,
    unmatched: str = "identity",
    adaptive: bool = False,
    damping_every: int = 5,
    min_damping: float = 1e-8,
    axis_name: str | None = None,
    seed: int = 0,
    norm_constraint_learning_rate: optax.ScalarOrSchedule = 1.0,
) -> optax.GradientTransformationExtraArgs:
    """Precondition gradients with K-FAC: ``(A (x) B + lam I)^{-1} grad``, per layer.

    For each layer found in ``apply_fn`` (dense, convolution), with moving averages of the
    factors ``A = E[[h;1][h;1]^T]`` and ``B = E[g g^T]`` (:func:`kfax.kronecker_factors`), the
    weight gradient ``M`` (as a ``(d_in, d_out)`` matrix) becomes

    * factored damping: ``(A + pi sqrt(lam) I)^{-1} M (B + sqrt(lam)/pi I)^{-1}``,
      ``pi = sqrt((tr A / d_A) / (tr B / d_B))``;
    * eigen damping: ``Q_A [(Q_A^T M Q_B) / (s_A s_B^T + lam)] Q_B^T`` (exact Tikhonov), where
      EKFAC (``eigen_correction=True``) replaces ``s_A s_B^T`` by the re-estimated diagonal
      ``E[(Q_A^T h)^2 (Q_B^T g)^2]``;
    * centered (default, layers with a bias): ``C = E[h h^T] - m m^T`` replaces ``A``, the weight
      update is ``C^{-1} (dK - m db^T) B^{-1}`` and the bias update ``B^{-1} db - Delta_K^T m``
      (``bias_update="exact"``) or ``B^{-1} db`` (``"simple"``). At zero damping this equals
      homogeneous K-FAC exactly.

    The result is the preconditioned direction (to be scaled by ``-learning_rate``), unless
    ``adaptive=True``: then the step size ``alpha`` and momentum ``mu`` minimising the quadratic
    model ``q(d) = <grad, d> + 1/2 d^T (G + lam I) d`` over ``d = alpha Delta + mu d_prev`` are
    chosen each step (Martens & Grosse 2015, section 7) and the result is ``-d`` (chain with
    ``optax.scale(-1)``, as :func:`kfac` does).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs``; layers are found by tracing it.
      loss: an output distribution from :mod:`kfax.losses`.
      example_inputs: an array or ``jax.ShapeDtypeStruct`` shaped like a batch of inputs (any
        batch size); needed by ``init`` to find the layers.
      damping: ``lam``, a float or an optax schedule of the step count; with
        ``adaptive_damping`` the initial value of the Levenberg-Marquardt rule.
      damping_method: ``"factored"`` (pi-damped inverses) or ``"eigen"`` (exact Tikhonov).
      adaptive_damping: adjust ``lam`` every ``damping_every`` steps by the reduction ratio
        ``rho`` of the quadratic model (Martens & Grosse 2015, section 6.5); needs ``targets``.
      kind: ``"mc"`` (true Fisher, sampled targets), ``"exact"`` (Gauss-Newton), ``"empirical"``.
      samples: targets sampled per input for ``kind="mc"``.
      centered: centered K-FAC for layers with a bias; ``False`` gives homogeneous K-FAC.
      ema_decay: moving-average decay of the factors (bias-corrected; 0 = this batch only).
      stats_every, inverse_every: cadences (in steps) of statistics and inverse refreshes.
      stats_batch_size: compute statistics on the first examples of each batch only.
      eigen_correction: EKFAC (George et al. 2018); implies eigendecompositions.
      bias_update: ``"exact"`` or ``"simple"`` centered bias update.
      norm_constraint: if set, scale the direction so that
        ``lr^2 <Delta, grad> <= norm_constraint`` (Ba et al. 2017), with ``lr`` given by
        ``norm_constraint_learning_rate`` (a float, array or schedule; :func:`kfac` passes its
        learning rate).
      unmatched: parameters outside any layer are passed through (``"identity"``) or scaled
        like Adam (``"adam"``, ``b1=0.9, b2=0.999, eps=1e-8``).
      adaptive: choose step size and momentum from the quadratic model (see above).
      damping_every: cadence of the adaptive damping rule.
      min_damping: lower bound of the adaptive damping.
      axis_name: reserved for cross-device averaging of statistics (``pmap``); not supported yet.
      seed: seed of the PRNG key that samples targets.
      norm_constraint_learning_rate: the learning rate that will scale the direction, for the
        norm constraint only.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params, *,
      inputs, targets=None)`` takes the gradient of the mean loss on ``inputs``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, kfax
      >>> params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
      >>> apply_fn = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]
      >>> loss = kfax.losses.SquaredError()
      >>> x, y = jnp.ones((8, 3)), jnp.ones((8, 2))
      >>> opt = optax.chain(kfax.scale_by_kfac(apply_fn, loss, example_inputs=x), optax.scale(-0.5))
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: loss(apply_fn(p, x), y))(params)
      >>> updates, state = opt.update(grads, state, params, inputs=x, targets=y)

    References:
      Martens & Grosse, ICML 2015 (K-FAC, adaptive damping, step size and momentum). Grosse &
      Martens, ICML 2016 (KFC). Ba, Grosse & Martens, ICLR 2017 (norm constraint). George et
      al., NeurIPS 2018 (EKFAC). George, "The algebra of second order methods" (centering).
    """
    check_loss(loss)
    check_kind(kind)
    check_samples(samples)
    _check_positive("damping", damping)
    _check_choice("damping_method", damping_method, ("factored", "eigen"))
    _check_choice("bias_update", bias_update, ("exact", "simple"))
    _check_choice("unmatched", unmatched, ("identity", "adam"))
    _check_count("stats_every", stats_every)
    _check_count("inverse_every", inverse_every)
    _check_count("damping_every", damping_every)
    if stats_batch_size is not None:
        _check_count("stats_batch_size", stats_batch_size)
    if not _is_real(ema_decay) or not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}.")
    if norm_constraint is not None:
        _check_positive("norm_constraint", norm_constraint)
    if adaptive_damping and callable(damping):
        raise ValueError(
            "adaptive_damping=True adjusts the damping itself: pass a float initial damping, "
            "not a schedule."
        )
    if axis_name is not None:
        raise NotImplementedError(
            "axis_name (cross-device statistics) is not supported yet; average gradients with "
            "jax.lax.pmean and run scale_by_kfac per device, or leave axis_name=None."
        )
    eigen = damping_method == "eigen" or eigen_correction
    decay = float(ema_decay)

    def find(params, inputs) -> _tracing.Trace:
        return _capture.trace_layers(apply_fn, params, inputs)

    def input_dim(site) -> int:
        homogeneous = site.bias_leaf is not None and not centered
        return site.geometry.d_in + int(homogeneous)

    def init_fn(params):
        if example_inputs is None:
            raise ValueError(
                "scale_by_kfac needs example_inputs=... (an array or jax.ShapeDtypeStruct shaped "
                "like a batch of inputs, any batch size) when it is built: optax's init(params) "
                "sees no inputs, and kfax finds the layers by tracing apply_fn on them."
            )
        traced = find(params, example_inputs)
        leaves = jax.tree_util.tree_leaves(params)
        dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
        moments, curvature, scalings = {}, {}, {}
        for site in traced.layers:
            d_in, d_out = site.geometry.d_in, site.geometry.d_out
            moments[site.name] = Moments(
                jnp.zeros((d_in, d_in), dtype),
                jnp.zeros((d_in,), dtype),
                jnp.zeros((d_out, d_out), dtype),
            )
            da = input_dim(site)
            if eigen:
                curvature[site.name] = EigenBasis(
                    jnp.eye(da, dtype=dtype),
                    jnp.ones((da,), dtype),
                    jnp.eye(d_out, dtype=dtype),
                    jnp.ones((d_out,), dtype),
                )
            else:
                curvature[site.name] = FactoredInverse(
                    jnp.eye(da, dtype=dtype), jnp.eye(d_out, dtype=dtype)
                )
            if eigen_correction:
                scalings[site.name] = jnp.zeros((da, d_out), dtype)
        covered = {s.weight_leaf for s in traced.layers} | {s.bias_leaf for s in traced.layers}
        rest = {traced.leaf_paths[i]: leaf for i, leaf in enumerate(leaves) if i not in covered}
        unmatched_state = ()
        if unmatched == "adam":
            zeros = {k: jnp.zeros_like(v) for k, v in rest.items()}
            unmatched_state = (zeros, dict(zeros))
        initial_damping = damping(0) if callable(damping) else damping
        nan = jnp.full((), jnp.nan, dtype)
        return KFACState(
            count=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(seed),
            moments=moments,
            moments_weight=jnp.zeros((), dtype),
            curvature=curvature,
            scalings=scalings,
            scalings_weight=jnp.zeros((), dtype),
            damping=jnp.asarray(initial_damping, dtype),
            previous_update=jax.tree_util.tree_map(jnp.zeros_like, params) if adaptive else (),
            unmatched=unmatched_state,
            nonfinite_count=jnp.zeros((), jnp.int32),
            info=StepInfo(nan, nan, nan, nan),
        )

    # ---------------------------------------------------------------- statistics and inverses

    def input_factor(site, m: Moments) -> jax.Array:
        return factors_from_moments(m, site.bias_leaf is not None, centered).a

    def normalised(moments, weight):
        safe = jnp.where(weight > 0, weight, 1.0)
        return jax.tree_util.tree_map(lambda x: x / safe, moments)

    def refresh_curvature(sites, moments, weight, lam, old):
        factors = normalised(moments, weight)
        new = {}
        for site in sites:
            m = factors[site.name]
            a = input_factor(site, m)
            if eigen:
                s_a, q_a = _linalg.eigh(a)
                s_b, q_b = _linalg.eigh(m.output)
                new[site.name] = EigenBasis(q_a, s_a, q_b, s_b)
            else:
                new[site.name] = FactoredInverse(*_linalg.factored_inverses(a, m.output, lam))
        keep = _all_finite(new) & (weight > 0)
        return jax.tree_util.tree_map(lambda n, o: jnp.where(keep, n, o), new, old)

    def refresh_if(do_inverse, sites, moments, weight, lam, old):
        """The refreshed curvature on inverse steps, ``old`` otherwise."""
        return jax.lax.cond(
            do_inverse, lambda: refresh_curvature(sites, moments, weight, lam, old), lambda: old
        )

    def batch_scalings(sites, curvature, means, layer_inputs, cotangents, scale):
        """EKFAC diagonal ``scale * sum_rows (Q_A^T h)^2 (sum_columns (Q_B^T g)^2)``."""
        out = {}
        for site in sites:
            basis = curvature[site.name]
            h = site.geometry.input_rows(layer_inputs[site.name])
            h = h.astype(basis.q_a.dtype)
            if site.bias_leaf is not None:
                if centered:
                    h = h - means[site.name]
                else:
                    h = jnp.concatenate([h, jnp.ones((h.shape[0], 1), h.dtype)], axis=1)
            g = jax.vmap(site.geometry.output_rows)(cotangents[site.name]).astype(h.dtype)
            h_rot = jnp.matmul(h, basis.q_a, precision=_linalg.HIGHEST)
            g_rot = jnp.matmul(g, basis.q_b, precision=_linalg.HIGHEST)
            g_sq = jnp.sum(jnp.square(g_rot), axis=0)
            out[site.name] = (
                jnp.matmul(jnp.square(h_rot).T, g_sq, precision=_linalg.HIGHEST) * scale
            )
        return out

    def statistics_step(state, traced, params, inputs, targets, key, do_inverse, lam):
        tapped = _capture.capture(apply_fn, params, inputs, param_gradients=False, traced=traced)
        columns, scale = output_cotangents(
            loss, kind, tapped.outputs, targets=targets, key=key, samples=samples
        )
        cotangents = jax.vmap(lambda u: tapped.pullback(u)[1])(columns)
        batch = layer_moments(traced.layers, tapped.layer_inputs, cotangents, scale)
        finite = _all_finite(batch)
        moments = jax.tree_util.tree_map(
            lambda old, new: jnp.where(
                finite, decay * old + (1 - decay) * new.astype(old.dtype), old
            ),
            state.moments,
            batch,
        )
        weight = jnp.where(finite, decay * state.moments_weight + (1 - decay), state.moments_weight)
        curvature = refresh_if(do_inverse, traced.layers, moments, weight, lam, state.curvature)
        scalings, scalings_weight = state.scalings, state.scalings_weight
        if eigen_correction:
            means = {k: v.mean for k, v in normalised(moments, weight).items()}
            fresh = batch_scalings(
                traced.layers, curvature, means, tapped.layer_inputs, cotangents, scale
            )
            restart = do_inverse
            old = jax.tree_util.tree_map(lambda s: jnp.where(restart, 0.0, s), scalings)
            old_weight = jnp.where(restart, 0.0, scalings_weight)
            ok = finite & _all_finite(fresh)
            scalings = jax.tree_util.tree_map(
                lambda o, n: jnp.where(ok, decay * o + (1 - decay) * n.astype(o.dtype), o),
                old,
                fresh,
            )
            scalings_weight = jnp.where(ok, decay * old_weight + (1 - decay), old_weight)
        nonfinite = state.nonfinite_count + jnp.where(finite, 0, 1).astype(jnp.int32)
        return moments, weight, curvature, scalings, scalings_weight, nonfinite

    # ---------------------------------------------------------------- preconditioning

    def precondition_layer(site, curv, factors, scaling, lam, grad_w, grad_b):
        geometry = site.geometry
        dk = geometry.weight_matrix(grad_w).astype(factors.second.dtype)
        db = None if grad_b is None else grad_b.astype(dk.dtype)
        homogeneous = db is not None and not centered
        mean = factors.mean
        if db is not None and centered:
            dk = dk - jnp.outer(mean, db)
        if homogeneous:
            dk = jnp.concatenate([dk, db[None, :]], axis=0)

        if eigen:
            scale = scaling if eigen_correction else jnp.outer(curv.s_a, curv.s_b)
            delta = _linalg.eigen_apply(curv.q_a, curv.q_b, scale, dk, lam)

            def b_solve(v):
                rotated = (v @ curv.q_b) / (curv.s_b + lam)
                return rotated @ curv.q_b.T
        else:
            delta = _linalg.kron_apply(curv.a_inv, dk, curv.b_inv)

            def b_solve(v):
                return v @ curv.b_inv

        if homogeneous:
            delta_k, delta_b = delta[:-1], delta[-1]
        elif db is not None:
            delta_k = delta
            delta_b = b_solve(db)
            if bias_update == "exact":
                delta_b = delta_b - delta_k.T @ mean
        else:
            delta_k, delta_b = delta, None
        new_w = geometry.weight_from_matrix(delta_k).astype(grad_w.dtype)
        return new_w, None if delta_b is None else delta_b.astype(grad_b.dtype)

    def check_structure(state, traced, params):
        def same_shapes(reference, what):
            ref = [(jnp.shape(a), k) for k, a in reference]
            got = dict(zip(traced.leaf_paths, jax.tree_util.tree_leaves(params), strict=True))
            for shape, path in ref:
                if path not in got or jnp.shape(got[path]) != shape:
                    found_shape = jnp.shape(got[path]) if path in got else "missing"
                    raise ValueError(
                        f"params do not match the K-FAC state: {what} {path!r} had shape "
                        f"{shape} at init, now {found_shape}."
                    )

        if unmatched == "adam":
            same_shapes(list(state.unmatched[0].items()), "parameter")
        if adaptive:
            flat = jax.tree_util.tree_leaves(state.previous_update)
            same_shapes(list(zip(traced.leaf_paths, flat, strict=False)), "parameter")
            if len(flat) != len(traced.leaf_paths):
                raise ValueError(
                    "params do not match the K-FAC state: the state holds "
                    f"{len(flat)} parameter arrays, params have {len(traced.leaf_paths)}."
                )
        found = {s.name: s for s in traced.layers}
        if set(found) != set(state.moments):
            raise ValueError(
                "params do not match the K-FAC state: the state was built for layers "
                f"{sorted(state.moments)}, but apply_fn on these params has layers {sorted(found)}."
            )
        for name, site in found.items():
            expected = state.moments[name].second.shape[0], state.moments[name].output.shape[0]
            got = site.geometry.d_in, site.geometry.d_out
            if expected != got:
                raise ValueError(
                    f"params do not match the K-FAC state: layer {name!r} has (d_in, d_out) = "
                    f"{got}, the state was built for {expected}."
                )

    def quadratic_step(params, inputs, grads, direction, previous, lam):
        """alpha, mu minimising q(alpha Delta + mu d_prev), with Delta = -direction."""
        delta = jax.tree_util.tree_map(jnp.negative, direction)

        def model(p):
            return apply_fn(p, inputs)

        # One forward pass for both directions: vmap batches the tangents, not the primal.
        tangents = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), delta, previous)
        outputs, both = jax.vmap(lambda t: jax.jvp(model, (params,), (t,)), out_axes=(None, 0))(
            tangents
        )
        jd, jp = both[0], both[1]
        n = outputs.shape[0]
        wide = jnp.promote_types(outputs.dtype, lam.dtype)
        outputs, jd, jp = (x.astype(wide) for x in (outputs, jd, jp))
        djd = loss.curvature_product(outputs, jd)
        djp = loss.curvature_product(outputs, jp)
        dd = _tree_vdot(delta, delta)
        dp = _tree_vdot(delta, previous)
        pp = _tree_vdot(previous, previous)
        m11 = jnp.vdot(jd, djd) / n + lam * dd
        m12 = jnp.vdot(jp, djd) / n + lam * dp
        m22 = jnp.vdot(jp, djp) / n + lam * pp
        b1 = _tree_vdot(grads, delta)
        b2 = _tree_vdot(grads, previous)
        det = m11 * m22 - m12 * m12
        use_two = (pp > 0) & (det > 1e-12 * jnp.abs(m11 * m22))
        safe_det = jnp.where(use_two, det, 1.0)
        alpha_2 = (-b1 * m22 + b2 * m12) / safe_det
        mu_2 = (b1 * m12 - b2 * m11) / safe_det
        alpha_1 = -b1 / jnp.where(m11 > 0, m11, 1.0)
        alpha = jnp.where(use_two, alpha_2, alpha_1)
        mu = jnp.where(use_two, mu_2, 0.0)
        predicted = 0.5 * (alpha * b1 + mu * b2)
        step = jax.tree_util.tree_map(
            lambda d, p: (alpha * d + mu * p).astype(d.dtype), delta, previous
        )
        return step, alpha, mu, predicted, outputs

    def update_fn(updates, state, params=None, *, inputs=None, targets=None, **extra):
        del extra
        if params is None:
            raise ValueError(
                "scale_by_kfac.update needs params (optax: update(grads, state, params, ...))."
            )
        if inputs is None:
            raise ValueError(
                "scale_by_kfac.update needs inputs=... , the batch the gradient was computed on: "
                "opt.update(grads, state, params, inputs=x, targets=y)."
            )
        if kind == "empirical" and targets is None:
            raise ValueError("kind='empirical' needs targets=... in update (the data labels).")
        if adaptive_damping and targets is None:
            raise ValueError(
                "adaptive_damping=True needs targets=... in update to measure the loss."
            )
        stats_inputs, stats_targets = inputs, targets
        if stats_batch_size is not None:
            stats_inputs = jax.tree_util.tree_map(lambda x: x[:stats_batch_size], inputs)
            if targets is not None:
                stats_targets = jax.tree_util.tree_map(lambda x: x[:stats_batch_size], targets)
        traced = find(params, stats_inputs)
        check_structure(state, traced, params)

        count = state.count
        key, stats_key = jax.random.split(state.key)
        lam = damping(count) if callable(damping) else state.damping
        lam = jnp.asarray(lam, state.damping.dtype)
        do_stats = count % stats_every == 0
        do_inverse = count % inverse_every == 0

        def with_stats():
            return statistics_step(
                state, traced, params, stats_inputs, stats_targets, stats_key, do_inverse, lam
            )

        def without_stats():
            curvature = refresh_if(
                do_inverse,
                traced.layers,
                state.moments,
                state.moments_weight,
                lam,
                state.curvature,
            )
            return (
                state.moments,
                state.moments_weight,
                curvature,
                state.scalings,
                state.scalings_weight,
                state.nonfinite_count,
            )

        moments, weight, curvature, scalings, scalings_weight, nonfinite = jax.lax.cond(
            do_stats, with_stats, without_stats
        )

        factors = normalised(moments, weight)
        scaled = (
            normalised(scalings, jnp.maximum(scalings_weight, 1e-30)) if eigen_correction else {}
        )
        grad_leaves, treedef = jax.tree_util.tree_flatten(updates)
        out_leaves = list(grad_leaves)
        for site in traced.layers:
            grad_b = None if site.bias_leaf is None else grad_leaves[site.bias_leaf]
            new_w, new_b = precondition_layer(
                site,
                curvature[site.name],
                factors[site.name],
                scaled.get(site.name),
                lam,
                grad_leaves[site.weight_leaf],
                grad_b,
            )
            out_leaves[site.weight_leaf] = new_w
            if new_b is not None:
                out_leaves[site.bias_leaf] = new_b

        unmatched_state = state.unmatched
        if unmatched == "adam":
            mu_old, nu_old = state.unmatched
            index = {p: i for i, p in enumerate(traced.leaf_paths)}
            step = (count + 1).astype(jnp.float32)
            mu_new, nu_new = {}, {}
            for path in mu_old:
                g = grad_leaves[index[path]]
                mu_new[path] = 0.9 * mu_old[path] + 0.1 * g
                nu_new[path] = 0.999 * nu_old[path] + 0.001 * jnp.square(g)
                m_hat = mu_new[path] / (1 - 0.9**step)
                v_hat = nu_new[path] / (1 - 0.999**step)
                out_leaves[index[path]] = (m_hat / (jnp.sqrt(v_hat) + 1e-8)).astype(g.dtype)
            unmatched_state = (mu_new, nu_new)

        direction = jax.tree_util.tree_unflatten(treedef, out_leaves)
        if norm_constraint is not None:
            rate = norm_constraint_learning_rate
            rate = rate(count) if callable(rate) else rate
            inner = jnp.abs(_tree_vdot(direction, updates)) * jnp.square(rate)
            coefficient = jnp.minimum(1.0, jnp.sqrt(norm_constraint / jnp.maximum(inner, 1e-30)))
            direction = jax.tree_util.tree_map(
                lambda d: (coefficient * d).astype(d.dtype), direction
            )

        nan = jnp.full((), jnp.nan, state.damping.dtype)
        info = StepInfo(nan, nan, nan, nan)
        new_damping = state.damping
        previous = state.previous_update
        if adaptive:
            step, alpha, mu, predicted, outputs = quadratic_step(
                params, stats_inputs, updates, direction, state.previous_update, lam
            )
            rho = nan
            if adaptive_damping:
                adapt = count % damping_every == 0

                def ratio():
                    new_params = jax.tree_util.tree_map(
                        lambda p, s: p + s.astype(p.dtype), params, step
                    )
                    before = loss(outputs, stats_targets)
                    after = loss(
                        apply_fn(new_params, stats_inputs).astype(outputs.dtype), stats_targets
                    )
                    return (after - before) / jnp.minimum(predicted, -1e-30)

                rho = jax.lax.cond(adapt, ratio, lambda: nan)
                omega = (19.0 / 20.0) ** damping_every
                lam_next = jnp.where(
                    rho > 0.75, lam * omega, jnp.where(rho < 0.25, lam / omega, lam)
                )
                lam_next = jnp.where(adapt & jnp.isfinite(rho), lam_next, lam)
                new_damping = jnp.clip(lam_next, min_damping, 1e10).astype(state.damping.dtype)
            info = StepInfo(*(jnp.asarray(v, nan.dtype) for v in (alpha, mu, predicted, rho)))
            previous = step
            direction = jax.tree_util.tree_map(jnp.negative, step)

        new_state = KFACState(
            count=count + 1,
            key=key,
            moments=moments,
            moments_weight=weight,
            curvature=curvature,
            scalings=scalings,
            scalings_weight=scalings_weight,
            damping=new_damping,
            previous_update=previous,
            unmatched=unmatched_state,
            nonfinite_count=nonfinite,
            info=info,
        )
        return direction, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kfac(
    learning_rate: optax.ScalarOrSchedule | None,
    apply_fn: Callable[[Any, Any], jax.Array],
    loss: Loss,
    *,
    momentum: float | None = 0.9,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC with momentum and a learning rate, in optax's style.

    ``learning_rate`` (a float or schedule) gives
    ``chain(scale_by_kfac(...), trace(momentum), scale_by_learning_rate(learning_rate))`` with
    defaults ``damping=1e-2`` and ``norm_constraint=1e-2`` (the bound on
    ``lr^2 <Delta, grad>`` that keeps a fixed learning rate stable; Ba et al. 2017).
    ``learning_rate=None`` selects the adaptive mode of Martens & Grosse (2015): step size and
    momentum from the quadratic model every step, and Levenberg-Marquardt adaptive damping
    starting from ``damping`` (default ``1e-2``); ``update`` then needs ``targets``. Measured on
    small MNIST models: 1.0 is far too large (the rule lowers it slowly), 1e-3 diverged on a small
    CNN before the first adjustment.

    Args:
      learning_rate: a float, an optax schedule, or ``None`` for the adaptive mode.
      apply_fn, loss: as in :func:`scale_by_kfac`.
      momentum: heavy-ball momentum for a fixed learning rate (``None`` or 0 for none).
      **options: passed to :func:`scale_by_kfac` (``example_inputs`` is required).

    Example:
      >>> import jax, jax.numpy as jnp, optax, kfax
      >>> params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
      >>> apply_fn = lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"]
      >>> x, y = jnp.ones((8, 3)), jnp.ones((8, 2))
      >>> opt = kfax.kfac(None, apply_fn, kfax.losses.SquaredError(), example_inputs=x)
      >>> state = opt.init(params)
      >>> grads = jax.grad(lambda p: kfax.losses.SquaredError()(apply_fn(p, x), y))(params)
      >>> updates, state = opt.update(grads, state, params, inputs=x, targets=y)
      >>> params = optax.apply_updates(params, updates)
    """
    options.setdefault("damping", 1e-2)
    if learning_rate is None:
        options.setdefault("adaptive_damping", True)
        options["adaptive"] = True
        return optax.chain(scale_by_kfac(apply_fn, loss, **options), optax.scale(-1.0))
    options.setdefault("norm_constraint", 1e-2)
    options["norm_constraint_learning_rate"] = learning_rate
    parts = [scale_by_kfac(apply_fn, loss, **options)]
    if momentum:
        parts.append(optax.trace(decay=momentum))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
