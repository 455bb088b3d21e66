"""Data-parallel K-FAC on every device of the machine: a Flax MLP classifier on MNIST.

The same script runs unchanged on one CPU, on simulated CPU devices and on a multi-GPU or TPU
host: each batch is split over all devices (``jax.devices()``) and every device holds the same
parameters and K-FAC state. Two ways, both JAX's own machinery:

* ``--mode jit`` (default): sharded ``jax.jit`` over a one-axis mesh of type ``Auto``; the
  batch is sharded, parameters and state replicated, and XLA inserts the collectives. kfax needs
  no ``axis_name``; the steps run under ``jax.set_mesh(mesh)``, whose devices
  ``--inverse-strategy distributed`` spreads the inverses over.
* ``--mode shard_map``: ``jax.shard_map`` over the same mesh with ``axis_name="batch"`` on the
  kfax transform: statistics are pooled in one all-reduce.

With ``--inverse-strategy distributed`` (either mode) each layer's inverse is computed on one
device and shared. With ``--shard-state`` (``--mode jit``) the K-FAC state is split over the
devices instead of replicated (``kfax.state_shardings``): each device holds 1/n of every factor
and inverse whose size divides over the devices.

Commands (README, "Across devices")::

    python -m examples.data_parallel                                  # all local devices
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m examples.data_parallel --mode shard_map --inverse-strategy distributed
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m examples.data_parallel --inverse-strategy distributed --shard-state
    python -m examples.data_parallel --batch-size 4096                # a multi-GPU / TPU host

Data: the MNIST test set in ``../shared/data/mnist`` (``$KFAX_MNIST_DIR``); without it,
scikit-learn's digits, as printed.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import kfax
from examples.data import load_mnist
from examples.models import MLPClassifier

LOSS = kfax.losses.SoftmaxCrossEntropy()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("jit", "shard_map"), default="jit")
    parser.add_argument(
        "--inverse-strategy", choices=kfax.distributed.INVERSE_STRATEGIES, default="replicated"
    )
    parser.add_argument(
        "--shard-state",
        action="store_true",
        help="split the K-FAC factors and inverses over the devices (--mode jit)",
    )
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--width", type=int, default=256, help="of the two hidden layers")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def check_divides(batch_size: int, devices: int) -> None:
    if batch_size < devices:
        raise SystemExit(
            f"--batch-size {batch_size} gives no example to some of the {devices} devices; use a "
            f"positive multiple of {devices}."
        )
    if batch_size % devices:
        raise SystemExit(
            f"--batch-size {batch_size} does not divide over {devices} devices: each device "
            f"takes an equal share; use a multiple of {devices} (e.g. "
            f"{max(devices, batch_size // devices * devices)})."
        )


def make_step(opt, apply_fn, mesh: jax.sharding.Mesh, mode: str, state_sharding=None):
    """``step(params, state, x, y) -> (params, state, loss)``, jitted over ``mesh``; the new
    state laid out as ``state_sharding`` when given (``--mode jit``)."""

    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(lambda p: LOSS(apply_fn(p, x), y))(params)
        if mode == "shard_map":  # per-device gradients: average them across the batch axis
            loss, grads = jax.lax.pmean((loss, grads), "batch")
        updates, state = opt.update(grads, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state, loss

    if mode == "shard_map":
        # check_vma=False: kfax replays apply_fn from a trace made outside the map (README).
        specs = (P(), P(), P("batch"), P("batch"))
        step = jax.shard_map(
            step, mesh=mesh, in_specs=specs, out_specs=(P(), P(), P()), check_vma=False
        )
    if state_sharding is not None:
        replicated = NamedSharding(mesh, P())
        return jax.jit(
            step, donate_argnums=(0, 1), out_shardings=(replicated, state_sharding, replicated)
        )
    return jax.jit(step, donate_argnums=(0, 1))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    devices = jax.device_count()
    check_divides(args.batch_size, devices)
    if args.shard_state and args.mode != "jit":
        raise SystemExit("--shard-state splits the state under sharded jit: use --mode jit.")
    data = load_mnist()
    images, labels = data.images, data.labels
    held_out = slice(0, 1000)
    train_x, train_y = images[1000:], labels[1000:]
    batch_size = min(args.batch_size, train_x.shape[0] // devices * devices)

    mesh = jax.make_mesh((devices,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    module = MLPClassifier(features=(args.width, args.width))
    params = module.init(jax.random.key(args.seed), jnp.zeros((1, images.shape[1])))["params"]

    def apply_fn(p, x):
        return module.apply({"params": p}, x)

    per_device = batch_size // devices
    axis = {"axis_name": "batch"} if args.mode == "shard_map" else {}
    opt = kfax.kfac(
        None,
        apply_fn,
        LOSS,
        # the batch each call of apply_fn sees: a device's share under shard_map
        example_inputs=jax.ShapeDtypeStruct(
            (per_device if args.mode == "shard_map" else batch_size, images.shape[1]),
            jnp.float32,
        ),
        inverse_strategy=args.inverse_strategy,
        **axis,
    )
    params = jax.device_put(params, replicated)
    layout = kfax.state_shardings(opt.init(params), mesh) if args.shard_state else replicated
    state = jax.device_put(opt.init(params), layout)
    step = make_step(opt, apply_fn, mesh, args.mode, layout if args.shard_state else None)
    state_mb = state_megabytes_per_device(state)

    print(
        f"{devices} {jax.devices()[0].platform} device(s), mode {args.mode}, inverses "
        f"{args.inverse_strategy}, batch {batch_size} ({per_device} per device), {data.name} "
        f"({train_x.shape[0]} training images); K-FAC state {state_mb:.2f} MB per device"
    )
    rng = np.random.default_rng(args.seed)
    losses, begin = [], time.perf_counter()
    # Under sharded jit, distributed inverses spread over the devices of the mesh set here.
    with jax.set_mesh(mesh) if args.mode == "jit" else contextlib.nullcontext():
        for i in range(args.steps):
            rows = rng.choice(train_x.shape[0], batch_size, replace=False)
            x = jax.device_put(train_x[rows], split)
            y = jax.device_put(train_y[rows], split)
            params, state, loss = step(params, state, x, y)
            losses.append(float(loss))
            if i % 25 == 0 or i == args.steps - 1:
                print(f"step {i:4d}  loss {losses[-1]:.4f}  ({time.perf_counter() - begin:.1f} s)")
    logits = jax.jit(apply_fn)(params, images[held_out])
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == labels[held_out]))
    print(f"held-out accuracy {accuracy:.3f} after {args.steps} steps")
    return {
        "losses": losses,
        "accuracy": accuracy,
        "devices": devices,
        "state_mb_per_device": state_mb,
        "data": data.name,
    }


def state_megabytes_per_device(state) -> float:
    """The bytes of ``state`` held by the first device, in MB."""
    device = jax.devices()[0]
    held = 0
    for leaf in jax.tree.leaves(state):
        held += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    return held / 1e6


if __name__ == "__main__":
    main()
