"""Matrix-product layer operations: dense ``dot_general``, convolutions, embedding gathers.

Rules, tried by the walk (:mod:`kfax._tracing.finder`) on an equation that reads a parameter:

* ``dot_general`` with a parameter and data (no batch dimensions): a dense operation;
* ``conv_general_dilated`` with one group: a convolution (grouped ones are other uses, named by
  :func:`kfax._tracing.jaxprs.use_name`);
* ``gather`` of rows of a 2-D parameter at data-dependent ids: an embedding.

Each match records a :class:`~kfax._tracing.records.Site` with the layer's geometry (a
:mod:`kfax.layers` object, in the coordinates of the leaf without its stack axes) and where to
tap it; the walk then follows the operation's output, to which a bias may be added
(:mod:`kfax._tracing.elementwise`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kfax import layers
from kfax._tracing.records import TapSpec, shape_of
from kfax._tracing.refs import Level, WeightRef, reduced_axis, stack_axes


class ProductMatchers:
    """The matchers of matrix-product layer operations, a mixin of
    :class:`~kfax._tracing.finder.Finder`: the methods read the finder's ``leaf_shapes`` and call
    its ``is_data`` and ``_record``. Each returns the index of the recorded site, or ``None``
    when the equation is not such a layer operation.
    """

    def _reduced_shape(self, leaf: int, levels: Sequence[Level]) -> tuple[int, ...]:
        skip = set(stack_axes(levels))
        return tuple(s for a, s in enumerate(self.leaf_shapes[leaf]) if a not in skip)

    def _match_dense(self, eqn, in_refs, scope, path) -> int | None:
        contract, batch_dims = eqn.params["dimension_numbers"]
        if any(len(b) for b in batch_dims):
            return None
        for w_side in (1, 0):
            weight, x_atom = in_refs[w_side], eqn.invars[1 - w_side]
            if not isinstance(weight, WeightRef) or in_refs[1 - w_side] is not None:
                continue
            if not self.is_data(x_atom, scope) or not contract[w_side]:
                continue
            w_shape, x_shape = shape_of(eqn.invars[w_side]), shape_of(x_atom)
            w_contract, x_contract = tuple(contract[w_side]), tuple(contract[1 - w_side])
            w_free = [a for a in range(len(w_shape)) if a not in w_contract]
            x_free = len(x_shape) - len(x_contract)
            out_rank = x_free + len(w_free)
            out_features = (
                tuple(range(x_free, out_rank)) if w_side == 1 else tuple(range(len(w_free)))
            )
            reduced = [reduced_axis(weight.axes[a], weight.levels) for a in range(len(w_shape))]
            geometry = layers.dense_from_axes(
                self._reduced_shape(weight.leaf, weight.levels),
                tuple(reduced[a] for a in w_contract),
                tuple(reduced[a] for a in w_free),
            )
            out = eqn.outvars[0].aval
            tap = TapSpec(
                path, 1 - w_side, shape_of(eqn.outvars[0]), out.dtype, x_shape, out_features,
                x_contract,
            )  # fmt: skip
            features = tuple(w_shape[a] for a in w_free)
            return self._record("dense", geometry, weight, tap, features, scope)
        return None

    def _match_conv(self, eqn, in_refs, scope, path) -> int | None:
        weight = in_refs[1]
        if not isinstance(weight, WeightRef) or in_refs[0] is not None:
            return None
        if not self.is_data(eqn.invars[0], scope):
            return None
        p = eqn.params
        if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
            return None  # reported through the primitive's use name
        dn = p["dimension_numbers"]
        rhs_spec = tuple(dn.rhs_spec)
        w_shape = shape_of(eqn.invars[1])
        spatial = tuple(int(w_shape[a]) for a in rhs_spec[2:])

        def leaf_axis(a):
            return reduced_axis(weight.axes[a], weight.levels)

        geometry = layers.Conv(
            d_in=int(w_shape[rhs_spec[1]]) * int(np.prod(spatial)),
            d_out=int(w_shape[rhs_spec[0]]),
            filter_shape=spatial,
            window_strides=tuple(p["window_strides"]),
            padding=tuple(tuple(q) for q in p["padding"]),
            lhs_dilation=tuple(p["lhs_dilation"]),
            rhs_dilation=tuple(p["rhs_dilation"]),
            dimension_numbers=dn,
            output_axis=int(dn.out_spec[1]),
            weight_in_axis=leaf_axis(rhs_spec[1]),
            weight_out_axis=leaf_axis(rhs_spec[0]),
            weight_spatial_axes=tuple(leaf_axis(a) for a in rhs_spec[2:]),
        )
        out = eqn.outvars[0].aval
        tap = TapSpec(
            path, 0, shape_of(eqn.outvars[0]), out.dtype, shape_of(eqn.invars[0]),
            out_features=(int(dn.out_spec[1]),),
            conv_batch=(int(dn.lhs_spec[0]), int(dn.out_spec[0])),
        )  # fmt: skip
        return self._record("conv", geometry, weight, tap, (geometry.d_out,), scope)

    def _match_embedding(self, eqn, in_refs, scope, path) -> int | None:
        """``table[ids]``: rows of a 2-D parameter gathered at data-dependent integer ids (also
        vmapped, where the index vectors hold the id and a start of 0 along the features)."""
        table = in_refs[0]
        if not isinstance(table, WeightRef) or in_refs[1] is not None:
            return None
        ids = eqn.invars[1]
        shape, ids_shape = shape_of(eqn.invars[0]), shape_of(ids)
        dn, sizes = eqn.params["dimension_numbers"], tuple(eqn.params["slice_sizes"])
        starts = tuple(dn.start_index_map)
        if (
            not self.is_data(ids, scope)
            or len(shape) != 2
            or tuple(getattr(dn, "operand_batching_dims", ()))
            or not ids_shape
            or ids_shape[-1] != len(starts)
        ):
            return None
        vocab = next((a for a in starts if sizes[a] == 1 and sizes[1 - a] == shape[1 - a]), None)
        collapsed = tuple(dn.collapsed_slice_dims)
        if vocab is None or set(starts) - {0, 1} or collapsed not in ((), (vocab,)):
            return None
        offsets = tuple(dn.offset_dims)  # output axes of the non-collapsed operand axes, in order
        kept = [a for a in (0, 1) if a not in collapsed]
        if len(offsets) != len(kept):
            return None
        feature_axis = offsets[kept.index(1 - vocab)]
        geometry = layers.Embedding(
            shape[vocab],
            shape[1 - vocab],
            reduced_axis(table.axes[vocab], table.levels),
            index_width=len(starts),
            index_column=starts.index(vocab),
        )
        out = eqn.outvars[0].aval
        tap = TapSpec(
            path, 1, shape_of(eqn.outvars[0]), out.dtype, ids_shape,
            out_features=(int(feature_axis),), in_features=(len(ids_shape) - 1,),
        )  # fmt: skip
        return self._record("embedding", geometry, table, tap, (geometry.d_out,), scope)
