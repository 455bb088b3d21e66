"""Smoke test of the kfac-jax peer adapter on a small MNIST autoencoder.

Run it from the repository root in the benchmark environment (``make bench-venv``; jax
0.9.0.1)::

    .venv-bench/bin/python benchmarks/peers/smoke_kfac_jax.py [--steps 30]

The model is a 784-256-64-256-784 MLP with tanh on every hidden layer and
Bernoulli logits at the output. Its loss is the mean over the batch of the
per-image sigmoid cross-entropy summed over the pixels. The script trains it
with kfac-jax (adaptive mode) and then with optax.adam from the same initial
parameters on the same batches. For each it prints the losses, the time of
step 0 (compilation plus burn-in for kfac-jax) and the median time of the
steps after the warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks.peers import kfac_jax_runner  # noqa: E402

SIZES = (784, 256, 64, 256, 784)


def load_images(n=None):
    """MNIST images as float32 in [0, 1], shape (N, 784), or None if MNIST is absent
    (``examples.data``: ``$KFAX_MNIST_DIR`` or ``../shared/data/mnist``)."""
    from examples import data  # noqa: PLC0415

    root = data.default_mnist_dir()
    if not (root / "t10k-images-idx3-ubyte.gz").is_file():
        return None
    x = data.load_mnist(root).images
    return x if n is None else x[:n]


def init_params(key, sizes=SIZES):
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, din, dout) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=False)):
        params[f"dense_{i}"] = {
            "kernel": jax.random.normal(k, (din, dout), jnp.float32) / np.sqrt(din),
            "bias": jnp.zeros((dout,), jnp.float32),
        }
    return params


def apply_fn(params, x):
    n = len(params)
    h = x
    for i in range(n):
        p = params[f"dense_{i}"]
        h = h @ p["kernel"] + p["bias"]
        if i < n - 1:
            h = jnp.tanh(h)
    return h


def copy_tree(t):
    return jax.tree_util.tree_map(jnp.array, t)  # jnp.array copies by default


def batches(data, batch_size):
    i = 0
    while True:
        if i + batch_size > data.shape[0]:
            i = 0
        x = jnp.asarray(data[i : i + batch_size])
        i += batch_size
        yield (x, x)


def summarize(name, times, losses, warmup):
    steady = np.array(times[warmup:]) * 1e3
    print(
        f"[{name}] step0 {times[0] * 1e3:9.1f} ms | steps {warmup}.."
        f"{len(times) - 1}: median {np.median(steady):8.2f} ms, "
        f"mean {steady.mean():8.2f} ms, min {steady.min():8.2f} ms"
    )
    print(f"[{name}] loss first {losses[0]:.3f} last {losses[-1]:.3f}")
    return float(np.median(steady))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument(
        "--warmup",
        type=int,
        default=6,
        help="steps excluded from the steady-state timing (kfac-jax "
        "compiles a second step variant at step 4, its first "
        "damping update)",
    )
    ap.add_argument("--adam-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import kfac_jax  # pylint: disable=g-import-not-at-top

    print(
        f"jax {jax.__version__}, kfac_jax {kfac_jax.__version__}, "
        f"optax {optax.__version__}, devices {jax.devices()}"
    )

    data = load_images()
    if data is None:
        print("MNIST not found; using random binary data")
        data = (np.random.RandomState(0).rand(10000, 784) > 0.5).astype(np.float32)
    else:
        print(f"MNIST t10k images: {data.shape}")

    params0 = init_params(jax.random.PRNGKey(args.seed))

    # ---- kfac-jax, adaptive mode ----
    runner = kfac_jax_runner.make_kfac_jax(apply_fn, "sigmoid_xent", adaptive=True, seed=args.seed)
    it = batches(data, args.batch)
    first = next(it)
    params = copy_tree(params0)
    t0 = time.perf_counter()
    state = runner.init(params, first)
    jax.block_until_ready(state.opt_state)
    print(
        f"[kfac-jax] init (trace + layer auto-registration + compile) "
        f"{(time.perf_counter() - t0) * 1e3:.0f} ms"
    )
    k_losses, k_times = [], []
    batch = first
    for step in range(args.steps):
        t0 = time.perf_counter()
        params, state, loss = runner.step(params, state, batch)
        jax.block_until_ready(params)
        k_times.append(time.perf_counter() - t0)
        k_losses.append(loss)
        st = state.last_stats
        print(
            f"  kfac-jax step {step:3d} loss {loss:9.3f} "
            f"lr {float(st['learning_rate']):.3g} "
            f"mom {float(st['momentum']):.3g} "
            f"damping {float(st['damping']):.3g} "
            f"{k_times[-1] * 1e3:8.1f} ms"
        )
        batch = next(it)
    k_ms = summarize("kfac-jax", k_times, k_losses, args.warmup)

    # ---- optax.adam on the same model, same loss, same batches ----
    loss_fn = kfac_jax_runner.make_loss_fn(apply_fn, "sigmoid_xent", register=False)
    opt = optax.adam(args.adam_lr)

    @jax.jit
    def adam_step(p, s, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    params = copy_tree(params0)
    s = opt.init(params)
    it = batches(data, args.batch)
    a_losses, a_times = [], []
    for _ in range(args.steps):
        batch = next(it)
        t0 = time.perf_counter()
        params, s, loss = adam_step(params, s, batch)
        loss = float(loss)
        a_times.append(time.perf_counter() - t0)
        a_losses.append(loss)
    print("  adam losses: " + " ".join(f"{v:.2f}" for v in a_losses))
    a_ms = summarize("adam", a_times, a_losses, args.warmup)

    print(
        f"kfac-jax / adam time per step: {k_ms / a_ms:.1f}x "
        f"({k_ms:.2f} ms vs {a_ms:.2f} ms, median after warm-up)"
    )


if __name__ == "__main__":
    main()
