"""Shared test helpers. The suite runs once per backend: KERAS_BACKEND=tensorflow|jax|torch pytest."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_ARCHIVE = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar10-jpeg.tar.gz")
BACKEND = keras.backend.backend()


def value_and_grad(fn, x):
    """`fn(x) -> scalar`; returns (value, d value / d x) as NumPy, on the current backend."""
    x = np.asarray(x, dtype="float32")
    if BACKEND == "tensorflow":
        import tensorflow as tf

        variable = tf.Variable(x)
        with tf.GradientTape() as tape:
            value = fn(variable)
        return np.asarray(value), np.asarray(tape.gradient(value, variable))
    if BACKEND == "jax":
        import jax

        value, grad = jax.value_and_grad(fn)(jax.numpy.asarray(x))
        return np.asarray(value), np.asarray(grad)
    import torch

    tensor = torch.tensor(x, requires_grad=True)
    value = fn(tensor)
    value.backward()
    return value.detach().numpy(), tensor.grad.numpy()


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="session")
def cifar_root():
    """The real CIFAR-10 image folder, extracted once into the user cache (never into the repo)."""
    if not os.path.isfile(CIFAR_ARCHIVE):
        pytest.skip(f"{CIFAR_ARCHIVE} not found")
    from keras_mfm import data

    return data.resolve_data(CIFAR_ARCHIVE).root


def smooth_images(n, size, seed=0):
    """Images made of a few random low-frequency cosines per channel, in [0, 1].

    Unlike white noise, their masked frequencies are (partly) predictable from the kept ones, so
    a reconstruction loss on them can go down.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    out = np.zeros((n, size, size, 3))
    for _ in range(4):
        fy, fx = rng.uniform(0.5, 4, size=(2, n, 1, 1, 3))
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1, 3))
        out += np.cos(2 * np.pi * (fy * rows[None, :, :, None] + fx * cols[None, :, :, None]) / size + phase)
    return np.clip(0.5 + out / 8, 0, 1).astype("float32")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow_on(*backends): slow on these backends only (an end-to-end run that XLA or graph tracing makes "
        "several times longer there): in the default run on the other backends, with -m slow on these",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """`slow_on(...)` items become `slow` on the backends they name, before `-m` selects."""
    for item in items:
        marker = item.get_closest_marker("slow_on")
        if marker is not None and BACKEND in marker.args:
            item.add_marker(pytest.mark.slow)
