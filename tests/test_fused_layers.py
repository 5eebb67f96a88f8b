"""keras_mfm.layers.fused: Keras' Dense / LayerNormalization / Conv2D / BatchNormalization on PyTorch.

Every layer is held to a float64 NumPy reference of its formula (output and the gradients of
`sum(y * G)` with respect to the input and every weight), on every backend: on TensorFlow and JAX
they are Keras' layers, on PyTorch the fused path (checked with a spy) or Keras' fallback.
"""

import numpy as np
import pytest
from keras import ops

import keras
from keras_mfm.layers import fused
from tests.conftest import BACKEND, to_numpy, value_and_grad


def _grads(layer, x, upstream, training=None):
    """`layer(x)`, and the gradients of `sum(layer(x) * upstream)` w.r.t. x and the trainable
    weights, through `stateless_call` (so also the updated non-trainable weights), as NumPy."""
    trainable = [to_numpy(v) for v in layer.trainable_variables]
    non_trainable = list(layer.non_trainable_variables)
    arrays = [x] + trainable
    bounds = np.cumsum([0] + [a.size for a in arrays])
    flat = np.concatenate([a.ravel() for a in arrays]).astype("float32")
    upstream = ops.convert_to_tensor(upstream.astype("float32"))
    kwargs = {} if training is None else {"training": training}

    def loss(vector):
        parts = [ops.reshape(vector[a:b], arr.shape) for a, b, arr in zip(bounds[:-1], bounds[1:], arrays)]
        outputs, _ = layer.stateless_call(parts[1:], non_trainable, parts[0], **kwargs)
        return ops.sum(outputs * upstream)

    _, grad = value_and_grad(loss, flat)
    grads = [grad[a:b].reshape(arr.shape) for a, b, arr in zip(bounds[:-1], bounds[1:], arrays)]
    outputs, updated = layer.stateless_call(
        [ops.convert_to_tensor(w) for w in trainable], non_trainable, ops.convert_to_tensor(x), **kwargs
    )
    outputs = to_numpy(outputs)
    updated = [to_numpy(v) for v in updated]
    return outputs, grads, updated


@pytest.fixture
def spy(monkeypatch):
    """Records which `fused_torch` functions ran (PyTorch backend only)."""
    calls = []
    if BACKEND == "torch":
        from keras_mfm.backend.torch import layers as fused_torch

        for name in ("dense", "layer_norm", "conv2d", "batch_norm_training", "batch_norm_inference"):
            original = getattr(fused_torch, name)

            def wrapper(*args, _original=original, _name=name, **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(fused_torch, name, wrapper)
    return calls


def _random_weights(layer, rng):
    layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])


# -- Dense ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_matches_numpy_with_gradients(use_bias, spy):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6)).astype("float32")
    layer = fused.Dense(7, use_bias=use_bias)
    layer.build(x.shape)
    _random_weights(layer, rng)
    upstream = rng.normal(size=(2, 5, 7))
    outputs, grads, _ = _grads(layer, x, upstream)
    kernel = layer.get_weights()[0].astype("float64")
    bias = layer.get_weights()[1].astype("float64") if use_bias else 0.0
    x64 = x.astype("float64")
    np.testing.assert_allclose(outputs, x64 @ kernel + bias, atol=1e-5)
    np.testing.assert_allclose(grads[0], upstream @ kernel.T, atol=1e-5)
    np.testing.assert_allclose(grads[1], np.einsum("bti,bto->io", x64, upstream), atol=1e-4)
    if use_bias:
        np.testing.assert_allclose(grads[2], upstream.sum((0, 1)), atol=1e-4)
    assert spy == (["dense"] * 2 if BACKEND == "torch" else [])


def test_dense_activation_and_keras_equivalence():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3)).astype("float32")
    ours = fused.Dense(5, activation="relu")
    theirs = keras.layers.Dense(5, activation="relu")
    ours.build(x.shape), theirs.build(x.shape)
    _random_weights(theirs, rng)
    ours.set_weights(theirs.get_weights())
    np.testing.assert_allclose(to_numpy(ours(x)), to_numpy(theirs(x)), atol=1e-6)
    assert to_numpy(ours(x)).min() >= 0.0


# -- LayerNormalization -----------------------------------------------------------------------------
def test_layer_norm_matches_numpy_with_gradients(spy):
    rng = np.random.default_rng(9)
    x = (rng.normal(size=(2, 3, 6)) * 2 + 1).astype("float32")
    layer = fused.LayerNormalization(epsilon=1e-6)
    layer.build(x.shape)
    _random_weights(layer, rng)
    gamma, beta = (w.astype("float64") for w in layer.get_weights())
    upstream = rng.normal(size=x.shape)
    outputs, grads, _ = _grads(layer, x, upstream)
    x64 = x.astype("float64")
    mean, variance = x64.mean(-1, keepdims=True), x64.var(-1, keepdims=True)
    invstd = 1.0 / np.sqrt(variance + 1e-6)
    xhat = (x64 - mean) * invstd
    np.testing.assert_allclose(outputs, gamma * xhat + beta, atol=1e-5)
    dxhat = upstream * gamma
    dx = invstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    np.testing.assert_allclose(grads[0], dx, atol=1e-4)
    np.testing.assert_allclose(grads[1], (upstream * xhat).sum((0, 1)), atol=1e-4)
    np.testing.assert_allclose(grads[2], upstream.sum((0, 1)), atol=1e-4)
    assert spy == (["layer_norm"] * 2 if BACKEND == "torch" else [])


@pytest.mark.parametrize("kwargs", [dict(axis=[1, 2]), dict(rms_scaling=True), dict(center=False, scale=False)])
def test_layer_norm_other_cases_equal_keras(kwargs, spy):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2, 3, 6)).astype("float32")
    ours, theirs = fused.LayerNormalization(**kwargs), keras.layers.LayerNormalization(**kwargs)
    ours.build(x.shape), theirs.build(x.shape)
    if theirs.get_weights():
        _random_weights(theirs, rng)
        ours.set_weights(theirs.get_weights())
    np.testing.assert_allclose(to_numpy(ours(x)), to_numpy(theirs(x)), atol=1e-5)
    fused_case = BACKEND == "torch" and "axis" not in kwargs and "rms_scaling" not in kwargs
    assert spy == (["layer_norm"] if fused_case else [])


# -- Conv2D -----------------------------------------------------------------------------------------
def numpy_conv(x, kernel, bias, stride, padding):
    """NHWC x HWIO cross-correlation in float64; returns `(y, vjp)` with `vjp(G) -> (dx, dK, db)`."""
    kh, kw, cin, cout = kernel.shape
    if padding == "same":  # stride 1, odd kernels only (the cases tested)
        pads = ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0))
    else:
        pads = ((0, 0),) * 4
    xp = np.pad(x.astype("float64"), pads)
    out_h = (xp.shape[1] - kh) // stride + 1
    out_w = (xp.shape[2] - kw) // stride + 1
    kernel = kernel.astype("float64")

    def window(i, j):
        return xp[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]

    y = sum(window(i, j) @ kernel[i, j] for i in range(kh) for j in range(kw)) + (0.0 if bias is None else bias)

    def vjp(upstream):
        dxp = np.zeros_like(xp)
        dk = np.zeros_like(kernel)
        for i in range(kh):
            for j in range(kw):
                dk[i, j] = np.einsum("bhwc,bhwo->co", window(i, j), upstream)
                dxp[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :] += (
                    upstream @ kernel[i, j].T
                )
        dx = dxp[:, pads[1][0]:dxp.shape[1] - pads[1][1], pads[2][0]:dxp.shape[2] - pads[2][1], :]
        return dx, dk, upstream.sum((0, 1, 2))

    return y, vjp


CONV_CASES = [
    # kernel, stride, padding, in/out channels, size, fused on torch
    (1, 1, "valid", (6, 8), 7, True),
    (1, 2, "valid", (5, 6), 12, True),  # ResNet v1 downsamples with a strided 1x1
    (3, 1, "same", (4, 8), 9, True),
    (3, 2, "valid", (4, 8), 9, True),
    (7, 2, "valid", (3, 8), 16, True),  # a ResNet stem
    (4, 4, "valid", (3, 8), 16, True),  # a ViT patch embedding
    (3, 2, "same", (4, 8), 9, False),  # asymmetric "same" padding: Keras' path
]


@pytest.mark.parametrize("kernel_size,stride,padding,channels,size,fast", CONV_CASES)
def test_conv2d_matches_numpy_with_gradients(kernel_size, stride, padding, channels, size, fast, spy):
    rng = np.random.default_rng(kernel_size * 10 + stride)
    cin, cout = channels
    x = rng.normal(size=(2, size, size, cin)).astype("float32")
    layer = fused.Conv2D(cout, kernel_size, strides=stride, padding=padding)
    layer.build(x.shape)
    _random_weights(layer, rng)
    kernel, bias = (w.astype("float64") for w in layer.get_weights())
    if not fast:  # TensorFlow's asymmetric "same": Keras' own layer is the reference
        reference = keras.layers.Conv2D(cout, kernel_size, strides=stride, padding=padding)
        reference.build(x.shape)
        reference.set_weights(layer.get_weights())
        np.testing.assert_allclose(to_numpy(layer(x)), to_numpy(reference(x)), atol=1e-4)
        assert spy == []
        return
    y, vjp = numpy_conv(x, kernel, bias, stride, padding)
    upstream = rng.normal(size=y.shape)
    outputs, grads, _ = _grads(layer, x, upstream)
    dx, dk, db = vjp(upstream)
    np.testing.assert_allclose(outputs, y, atol=1e-4)
    np.testing.assert_allclose(grads[0], dx, atol=1e-4)
    np.testing.assert_allclose(grads[1], dk, atol=2e-4 * max(1.0, np.abs(dk).max()))
    np.testing.assert_allclose(grads[2], db, atol=1e-4 * max(1.0, np.abs(db).max()))
    assert spy.count("conv2d") == (2 if BACKEND == "torch" else 0)


def test_conv2d_falls_back_for_dilation_and_channels_first(spy):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 9, 9, 2)).astype("float32")
    dilated = fused.Conv2D(3, 3, dilation_rate=2)
    theirs = keras.layers.Conv2D(3, 3, dilation_rate=2)
    dilated.build(x.shape), theirs.build(x.shape)
    _random_weights(theirs, rng)
    dilated.set_weights(theirs.get_weights())
    np.testing.assert_allclose(to_numpy(dilated(x)), to_numpy(theirs(x)), atol=1e-5)
    assert spy == []
    if BACKEND != "tensorflow":  # TensorFlow has no channels-first convolution on a CPU
        nchw = np.transpose(x, (0, 3, 1, 2))
        first = fused.Conv2D(3, 3, data_format="channels_first")
        first.build(nchw.shape)
        first.set_weights(theirs.get_weights())
        plain = keras.layers.Conv2D(3, 3)
        plain.build(x.shape)
        plain.set_weights(theirs.get_weights())
        np.testing.assert_allclose(
            np.transpose(to_numpy(first(nchw)), (0, 2, 3, 1)), to_numpy(plain(x)), atol=1e-5
        )
        assert spy == []


# -- BatchNormalization -----------------------------------------------------------------------------
def numpy_batch_norm(x, gamma, beta, eps, upstream):
    """Training-mode batch norm over (B, H, W) in float64: y, (dx, dgamma, dbeta), mean, variance."""
    x = x.astype("float64")
    mean = x.mean((0, 1, 2))
    variance = x.var((0, 1, 2))
    invstd = 1.0 / np.sqrt(variance + eps)
    xhat = (x - mean) * invstd
    y = gamma * xhat + beta
    n = x.shape[0] * x.shape[1] * x.shape[2]
    dxhat = upstream * gamma
    dx = invstd / n * (n * dxhat - dxhat.sum((0, 1, 2)) - xhat * (dxhat * xhat).sum((0, 1, 2)))
    return y, (dx, (upstream * xhat).sum((0, 1, 2)), upstream.sum((0, 1, 2))), mean, variance


def _batch_norm(rng, momentum=0.9, epsilon=1e-3, **kwargs):
    layer = fused.BatchNormalization(momentum=momentum, epsilon=epsilon, **kwargs)
    layer.build((None, 5, 5, 4))
    weights = [rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()]
    weights[-1] = rng.uniform(0.5, 2.0, size=weights[-1].shape).astype("float32")  # moving variance
    layer.set_weights(weights)
    return layer


def test_batch_norm_training_matches_numpy_and_updates_moving_statistics(spy):
    rng = np.random.default_rng(4)
    layer = _batch_norm(rng)
    gamma, beta, moving_mean, moving_variance = (w.astype("float64") for w in layer.get_weights())
    x = (rng.normal(size=(3, 5, 5, 4)) * 3 + 1).astype("float32")
    upstream = rng.normal(size=x.shape)
    outputs, grads, updated = _grads(layer, x, upstream, training=True)
    y, (dx, dgamma, dbeta), mean, variance = numpy_batch_norm(x, gamma, beta, 1e-3, upstream)
    np.testing.assert_allclose(outputs, y, atol=1e-4)
    np.testing.assert_allclose(grads[0], dx, atol=1e-4)
    np.testing.assert_allclose(grads[1], dgamma, atol=1e-3)
    np.testing.assert_allclose(grads[2], dbeta, atol=1e-3)
    # Keras' moving average with the biased batch variance
    np.testing.assert_allclose(updated[0], 0.9 * moving_mean + 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updated[1], 0.9 * moving_variance + 0.1 * variance, rtol=1e-5, atol=1e-6)
    assert spy == (["batch_norm_training"] * 2 if BACKEND == "torch" else [])


def test_batch_norm_inference_uses_moving_statistics(spy):
    rng = np.random.default_rng(5)
    layer = _batch_norm(rng, epsilon=1.001e-5)
    gamma, beta, moving_mean, moving_variance = (w.astype("float64") for w in layer.get_weights())
    x = rng.normal(size=(2, 5, 5, 4)).astype("float32")
    upstream = rng.normal(size=x.shape)
    outputs, grads, updated = _grads(layer, x, upstream, training=False)
    scale = gamma / np.sqrt(moving_variance + 1.001e-5)
    np.testing.assert_allclose(outputs, (x - moving_mean) * scale + beta, atol=1e-5)
    np.testing.assert_allclose(grads[0], upstream * scale, atol=1e-5)
    np.testing.assert_allclose(updated[0], moving_mean, atol=0)
    assert spy == (["batch_norm_inference"] * 2 if BACKEND == "torch" else [])


def test_batch_norm_without_affine_and_frozen(spy):
    rng = np.random.default_rng(6)
    layer = fused.BatchNormalization(center=False, scale=False, epsilon=1e-6)
    x = (rng.normal(size=(4, 3, 3, 2)) * 2 - 1).astype("float32")
    out = to_numpy(layer(x, training=True))
    np.testing.assert_allclose(out.mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.var((0, 1, 2)), 1.0, atol=1e-4)
    layer.trainable = False  # a frozen BatchNorm normalises with its moving statistics
    moving_mean, moving_variance = layer.get_weights()
    out = to_numpy(layer(x, training=True))
    np.testing.assert_allclose(out, (x - moving_mean) / np.sqrt(moving_variance + 1e-6), atol=1e-5)
    np.testing.assert_allclose(layer.get_weights()[0], moving_mean, atol=0)


def test_batch_norm_falls_back_for_other_axes_and_masks(spy):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 4, 3, 3)).astype("float32")
    ours = fused.BatchNormalization(axis=1)
    theirs = keras.layers.BatchNormalization(axis=1)
    ours.build(x.shape), theirs.build(x.shape)
    np.testing.assert_allclose(to_numpy(ours(x, training=True)), to_numpy(theirs(x, training=True)), atol=1e-5)
    assert spy == []


# -- serialisation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [
    fused.Dense(3, name="d"), fused.LayerNormalization(name="n"), fused.Conv2D(3, 3, padding="same", name="c"),
    fused.BatchNormalization(momentum=0.9, name="b"),
])
def test_layers_serialise_and_share_weights_with_keras(layer, tmp_path):
    config = keras.saving.serialize_keras_object(layer)
    assert config["registered_name"] == f"keras_mfm>{type(layer).__name__}"
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(layer) and restored.get_config() == layer.get_config()
    keras_twin = getattr(keras.layers, type(layer).__name__).from_config(layer.get_config())
    shape = (2, 4) if isinstance(layer, (fused.Dense, fused.LayerNormalization)) else (2, 6, 6, 3)
    inputs = keras.Input(shape[1:])
    model = keras.Model(inputs, layer(inputs))
    twin = keras.Model(inputs, keras_twin(inputs))
    rng = np.random.default_rng(8)
    twin.set_weights([rng.uniform(0.5, 1.5, size=w.shape).astype("float32") for w in twin.get_weights()])
    path = str(tmp_path / "twin.weights.h5")
    twin.save_weights(path)
    model.load_weights(path)
    x = rng.normal(size=shape).astype("float32")
    np.testing.assert_allclose(to_numpy(model(x)), to_numpy(twin(x)), atol=1e-5)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(reloaded.layers[-1]) is type(layer)
    np.testing.assert_allclose(to_numpy(reloaded(x)), to_numpy(twin(x)), atol=1e-5)
