"""End to end: K-FAC trains real MNIST models faster per step than a tuned Adam.

Small sizes (a subset of the images, a narrow autoencoder, few steps) so that this runs in CI;
the full-size comparison lives in ``benchmarks/``. Without ../shared/data/mnist the examples
fall back to scikit-learn's digits (1,797 8x8 images), where the autoencoder's margin is smaller:
each test states its expectation for each data set (measured values in the comments, 40 steps,
seed 0, on the project's 2-core machine).
"""

import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import kfax
from examples import data, models

STEPS = 40
BATCH = 250


def train(opt, params, apply_fn, loss, images, targets):
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        value, grads = jax.value_and_grad(lambda p: loss(apply_fn(p, x), y))(params)
        updates, state = opt.update(grads, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state, value

    n = images.shape[0]
    for i in range(STEPS):
        lo = (i * BATCH) % (n - BATCH + 1)
        params, state, _ = step(params, state, images[lo : lo + BATCH], targets[lo : lo + BATCH])
    return float(loss(apply_fn(params, images), targets))


def best_adam(params, apply_fn, loss, images, targets):
    return min(
        train(optax.adam(lr), params, apply_fn, loss, images, targets) for lr in (1e-3, 3e-3, 1e-2)
    )


@pytest.fixture(scope="module")
def mnist():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", data.MnistNotFoundWarning)
        ds = data.load_mnist()
    return ds.name, jnp.asarray(ds.images[:2000]), jnp.asarray(ds.labels[:2000])


def kfac_and_best_adam(learning_rate, params, apply_fn, loss, images, targets):
    """Final training loss of kfax.kfac (defaults) and of the best Adam of a small grid."""
    opt = kfax.kfac(learning_rate, apply_fn, loss, example_inputs=images[:BATCH])
    kfac = train(opt, params, apply_fn, loss, images, targets)
    return kfac, best_adam(params, apply_fn, loss, images, targets)


# Final loss of adaptive K-FAC over the best Adam's: measured 78.3 / 169.4 = 0.46 on MNIST,
# 14.74 / 18.62 = 0.79 on digits (a smaller autoencoder problem, closer to Adam's reach).
AUTOENCODER_RATIO = {"mnist": 0.6, "digits": 0.9}


def test_adaptive_kfac_beats_the_best_adam_on_the_mnist_autoencoder(mnist):
    name, images, _ = mnist
    d = images.shape[1]
    params, apply_fn = models.autoencoder(jax.random.key(0), sizes=(d, 128, 32, 128, d))
    loss = kfax.losses.SigmoidCrossEntropy()
    kfac, adam = kfac_and_best_adam(None, params, apply_fn, loss, images, images)
    assert kfac < AUTOENCODER_RATIO[name] * adam, (name, kfac, adam)


@pytest.mark.parametrize(
    ("learning_rate", "ratio"),
    # measured on MNIST: 0.068 and 0.023 against 0.145; on digits: 0.021 and 0.023 against 0.174
    [(0.1, 0.8), (None, 0.5)],
    ids=["fixed-learning-rate", "adaptive"],
)
def test_kfac_with_defaults_beats_the_best_adam_on_an_mnist_classifier(mnist, learning_rate, ratio):
    _, images, labels = mnist
    params, apply_fn = models.mlp_classifier(jax.random.key(0), images.shape[1], hidden=(64,))
    loss = kfax.losses.SoftmaxCrossEntropy()
    kfac, adam = kfac_and_best_adam(learning_rate, params, apply_fn, loss, images, labels)
    assert kfac < ratio * adam, (kfac, adam)
