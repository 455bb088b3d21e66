"""One process of a data-parallel kfax run over ``jax.distributed`` (run by
tests/test_multiprocess.py; not a test itself).

``python -m tests.multiprocess_worker --processes N --process-id I --port P --out F`` trains a
small MLP (float64, adaptive K-FAC with adaptive damping) for ``STEPS`` steps, each process on
its slice of the batch, in two ways: sharded ``jax.jit`` over a mesh of all processes' devices
(no ``axis_name``), and ``jax.shard_map`` with ``axis_name`` and distributed inverses. Process 0
saves both runs' final parameters to ``F`` (``.npz``). With ``--processes 1`` it is the
single-process run on the whole batch.
"""

import argparse

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kfax  # noqa: E402
from tests import models  # noqa: E402

BATCH = 32
STEPS = 10
LOSS = kfax.losses.SoftmaxCrossEntropy()


def train(mode: str, mesh: jax.sharding.Mesh) -> dict:
    params, apply_fn, x, _ = models.mlp(sizes=(4, 6, 5, 3), batch=BATCH)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x, y = x.astype(jnp.float64) + 1.0, jnp.arange(BATCH) % 3
    share = BATCH // jax.process_count()
    begin = jax.process_index() * share
    batch = NamedSharding(mesh, P("batch"))
    xs = jax.make_array_from_process_local_data(batch, np.asarray(x[begin : begin + share]))
    ys = jax.make_array_from_process_local_data(batch, np.asarray(y[begin : begin + share]))
    options = dict(damping_every=1, kind="exact")
    if mode == "shard_map":
        options.update(axis_name="batch", inverse_strategy="distributed")
    per_device = BATCH // mesh.size
    opt = kfax.kfac(None, apply_fn, LOSS, example_inputs=x[:per_device], **options)

    def step(p, s, xb, yb):
        g = jax.grad(lambda q: LOSS(apply_fn(q, xb), yb))(p)
        if mode == "shard_map":
            g = jax.lax.pmean(g, "batch")
        u, s = opt.update(g, s, p, inputs=xb, targets=yb)
        return optax.apply_updates(p, u), s

    if mode == "shard_map":
        specs = (P(), P(), P("batch"), P("batch"))
        step = jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=(P(), P()), check_vma=False)
    step = jax.jit(step)
    replicated = NamedSharding(mesh, P())
    p = jax.device_put(params, replicated)
    s = jax.device_put(opt.init(params), replicated)
    for _ in range(STEPS):
        p, s = step(p, s, xs, ys)
    return {
        jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
        for path, leaf in jax.tree_util.tree_flatten_with_path(p)[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{args.port}",
            num_processes=args.processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    auto = (jax.sharding.AxisType.Auto,)
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=auto)
    results = {
        f"{mode} {k}": v for mode in ("jit", "shard_map") for k, v in train(mode, mesh).items()
    }
    if jax.process_index() == 0:
        np.savez(args.out, **results)
    if args.processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
