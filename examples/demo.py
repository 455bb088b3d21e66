"""The kfax demo (``make demo``): the MNIST deep autoencoder, its layers, its factors, and
K-FAC against Adam.

1. Finds the layers of the autoencoder of Hinton & Salakhutdinov (784-1000-500-250-30-...-784)
   and prints them (``kfax.describe``), then the Kronecker factor shapes of one batch.
2. Trains it with Adam and with kfax's adaptive K-FAC on the same batches, for the same wall-clock
   budget, prints a table and saves a plot (``build/demo/kfac_vs_adam.png``).

Data: the 10,000 MNIST test images in ``../shared/data/mnist``; without them, scikit-learn's
digits (8x8) and a smaller autoencoder, as printed. Set ``KFAX_DEMO_SECONDS`` to change the budget.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfax
from examples.data import load_mnist
from examples.models import MNIST_AUTOENCODER_SIZES, autoencoder

DIGITS_AUTOENCODER_SIZES = (64, 128, 64, 32, 8, 32, 64, 128, 64)
BATCH = 1000
OUT = Path("build/demo")


def train(name, opt, params, apply_fn, loss, images, seconds):
    """Train for ``seconds`` of wall time (compilation excluded); returns (times, losses)."""
    state = opt.init(params)

    @jax.jit
    def step(params, state, x):
        value, grads = jax.value_and_grad(lambda p: loss(apply_fn(p, x), x))(params)
        updates, state = opt.update(grads, state, params, inputs=x, targets=x)
        return optax.apply_updates(params, updates), state, value

    rng = np.random.default_rng(0)
    order = rng.permutation(images.shape[0])
    batches = [images[order[i : i + BATCH]] for i in range(0, len(order) - BATCH + 1, BATCH)]
    jax.block_until_ready(step(params, state, batches[0]))  # compile
    times, losses, elapsed, i = [], [], 0.0, 0
    while elapsed < seconds:
        start = time.perf_counter()
        params, state, value = step(params, state, batches[i % len(batches)])
        value = float(value)
        elapsed += time.perf_counter() - start
        times.append(elapsed)
        losses.append(value)
        i += 1
    print(f"  {name:<18} {i:5d} steps in {elapsed:5.1f} s, last batch loss {losses[-1]:8.2f}")
    return np.array(times), np.array(losses)


def main() -> None:
    data = load_mnist()
    sizes = MNIST_AUTOENCODER_SIZES if data.name == "mnist" else DIGITS_AUTOENCODER_SIZES
    if data.name != "mnist":
        print("MNIST not found: using scikit-learn's 8x8 digits and a smaller autoencoder.")
    images = jnp.asarray(data.images)
    params, apply_fn = autoencoder(jax.random.key(0), sizes)
    loss = kfax.losses.SigmoidCrossEntropy()
    n_params = sum(int(np.size(p)) for p in jax.tree_util.tree_leaves(params))
    print(f"Data: {data.name}, {images.shape[0]} images of {images.shape[1]} pixels.")
    print(f"Autoencoder {'-'.join(map(str, sizes))}: {n_params:,} parameters.\n")
    print(kfax.describe(apply_fn, params, images[:BATCH]))

    factors = jax.jit(kfax.kronecker_factors(apply_fn, loss, kind="mc"))(
        params, images[:BATCH], key=jax.random.key(0)
    )
    print("\nKronecker factors of one batch (true Fisher, one sampled target per image):")
    for name, f in factors.items():
        print(
            f"  {name}: a {f.a.shape}, b {f.b.shape}, tr(a)={float(jnp.trace(f.a)):.3g}, "
            f"tr(b)={float(jnp.trace(f.b)):.3g}"
        )

    seconds = float(os.environ.get("KFAX_DEMO_SECONDS", "30"))
    print(f"\nTraining for {seconds:.0f} s of wall time each, batch {BATCH}:")
    runs = {
        "adam (lr 1e-3)": optax.adam(1e-3),
        "kfax adaptive": kfax.kfac(
            None, apply_fn, loss, example_inputs=images[:BATCH], stats_batch_size=BATCH // 4
        ),
    }
    results = {n: train(n, o, params, apply_fn, loss, images, seconds) for n, o in runs.items()}

    target = results["adam (lr 1e-3)"][1][-10:].mean()
    print(f"\nTime to reach Adam's final loss ({target:.1f}):")
    for name, (times, losses) in results.items():
        smooth = np.convolve(losses, np.ones(5) / 5, mode="valid")
        hit = np.nonzero(smooth <= target)[0]
        when = f"{times[hit[0] + 4]:6.1f} s" if hit.size else "   not reached"
        print(f"  {name:<18} {when}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib is not installed: no plot.)")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (times, losses) in results.items():
        ax.plot(times, losses, label=name)
    ax.set(
        xlabel="wall time (s)",
        ylabel="training loss (batch)",
        yscale="log",
        title=f"{data.name} autoencoder, batch {BATCH}",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "kfac_vs_adam.png", dpi=100)
    print(f"\nPlot saved to {OUT / 'kfac_vs_adam.png'}")


if __name__ == "__main__":
    main()
