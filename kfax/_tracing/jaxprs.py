"""The few facts about jaxprs that kfax relies on, in one place (public ``jax.extend.core``).

Which primitives are calls whose body can be evaluated inline, how to find that body, how to
evaluate one equation with JAX's own evaluator, and how to read a ``scan``'s parameters. Every
other module of :mod:`kfax._tracing` goes through these helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.extend.core as jcore

# Primitives whose single sub-jaxpr is a plain function of the equation's inputs: layers inside
# them are found and tapped by evaluating the sub-jaxpr inline. ``pjit`` is the pre-0.7 name of
# ``jit``; ``remat2`` is ``jax.checkpoint``.
CALL_PRIMITIVES = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "remat",
        "remat2",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
    }
)
# The calls that compute exactly their body (no custom derivative): parameters, layer outputs
# and biases are followed into them and out of them. A parameter that leaves a
# custom-derivative call is a use of its own (its gradient is whatever the rule says).
EXACT_CALLS = frozenset(
    {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint"}
)
_SUBJAXPR_PARAM_NAMES = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def is_var(atom: Any) -> bool:
    """A variable that holds a value (not a literal, not a dropped output ``_``).

    ``DropVar`` joined ``jax.extend.core`` after 0.9.0; it is recognised by name before that.
    """
    return isinstance(atom, jcore.Var) and type(atom).__name__ != "DropVar"


def subjaxpr(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    """The inlinable sub-jaxpr of a call-like equation as ``(jaxpr, consts)``, else ``None``."""
    if eqn.primitive.name not in CALL_PRIMITIVES:
        return None
    for key in _SUBJAXPR_PARAM_NAMES:
        sub = eqn.params.get(key)
        if sub is None:
            continue
        if isinstance(sub, jcore.ClosedJaxpr):
            jaxpr, consts = sub.jaxpr, sub.consts
        elif isinstance(sub, jcore.Jaxpr):
            jaxpr, consts = sub, ()
        else:
            continue
        if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
            return jaxpr, consts
    return None


class Scan(NamedTuple):
    """A ``scan`` equation's body and how its operands split (consts, carry, xs)."""

    jaxpr: Any
    consts: Sequence[Any]
    num_consts: int
    num_carry: int
    length: int
    reverse: bool
    unroll: Any


def scan_of(eqn: Any) -> Scan | None:
    """The body of a ``lax.scan`` equation (``nn.scan``, ``nnx.scan``, ``fori_loop`` with a
    static trip count), else ``None``."""
    if eqn.primitive.name != "scan":
        return None
    p = eqn.params
    closed = p["jaxpr"]
    if not isinstance(closed, jcore.ClosedJaxpr):
        return None
    return Scan(
        closed.jaxpr,
        closed.consts,
        int(p["num_consts"]),
        int(p["num_carry"]),
        int(p["length"]),
        bool(p.get("reverse", False)),
        p.get("unroll", 1),
    )


def varying_axes(value: Any) -> frozenset:
    """The mesh axes ``value`` varies over inside ``shard_map`` (``vma`` before JAX 0.10)."""
    aval = jax.typeof(value)
    manual = getattr(aval, "manual_axis_type", None)
    axes = getattr(manual, "varying", None) if manual is not None else getattr(aval, "vma", None)
    return frozenset(axes or ())


def eval_equation(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Evaluate one equation with JAX's own evaluator (robust to binding changes)."""
    in_vars, values, seen = [], [], set()
    for var, val in zip(eqn.invars, invals, strict=True):
        if is_var(var) and var not in seen:
            seen.add(var)
            in_vars.append(var)
            values.append(val)
    out_vars = [v for v in eqn.outvars if is_var(v)]
    extra = {}
    if hasattr(jcore, "DebugInfo"):  # public from JAX 0.10; a missing one is deprecated there
        extra["debug_info"] = jcore.DebugInfo(
            "kfax",
            eqn.primitive.name,
            tuple(f"in{i}" for i in range(len(in_vars))),
            tuple(f"out{i}" for i in range(len(out_vars))),
        )
    jaxpr = jcore.Jaxpr(
        constvars=[], invars=in_vars, outvars=out_vars, eqns=[eqn], effects=eqn.effects, **extra
    )
    results = iter(jcore.jaxpr_as_fun(jcore.ClosedJaxpr(jaxpr, []))(*values))
    return [next(results) if is_var(v) else None for v in eqn.outvars]


def use_name(eqn: Any) -> str:
    """How a parameter's use by ``eqn`` reads in a reason."""
    prim = eqn.primitive.name
    if prim == "conv_general_dilated" and (
        eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1
    ):
        return "conv_general_dilated with feature or batch groups (not supported yet)"
    return prim
