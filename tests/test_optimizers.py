"""LARS, LayerDecayAdamW and layer-wise lr-decay scales, against independent NumPy references."""

from types import SimpleNamespace

import keras
import numpy as np
import pytest

from keras_mfm import backbones
from keras_mfm.optimizers import LARS, LayerDecayAdamW, layer_decay_scales
from tests.conftest import BACKEND, to_numpy

TOL = dict(rtol=1e-6, atol=1e-6)


def fixed_gradients(shapes, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=s).astype("float32") for s in shapes] for _ in range(steps)]


# -- LARS ---------------------------------------------------------------------------------------
def lars_reference(weights, gradient_steps, lrs, momentum, weight_decay, trust_coefficient):
    """MAE util/lars.py, in float64 NumPy."""
    weights = [w.astype("float64") for w in weights]
    mus = [np.zeros_like(w) for w in weights]
    for lr, grads in zip(lrs, gradient_steps):
        for i, (w, g) in enumerate(zip(weights, grads)):
            d = g.astype("float64")
            if w.ndim > 1:
                d = d + weight_decay * w
                w_norm, d_norm = np.linalg.norm(w), np.linalg.norm(d)
                q = trust_coefficient * w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0
                d = d * q
            mus[i] = momentum * mus[i] + d
            weights[i] = w - lr * mus[i]
    return weights


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("schedule", [False, True])
def test_lars_matches_numpy_reference(weight_decay, schedule):
    rng = np.random.default_rng(1)
    initial = [
        rng.normal(size=(3, 2)).astype("float32"),  # kernel
        np.zeros((3, 2), "float32"),  # zero-initialised kernel: q = 1 on the first step
        rng.normal(size=(4, 3)).astype("float32"),  # kernel that gets zero gradients
        rng.normal(size=(2,)).astype("float32"),  # bias: plain momentum SGD
    ]
    steps = fixed_gradients([w.shape for w in initial], 3, seed=2)
    for grads in steps:
        grads[2][...] = 0.0
    if schedule:
        learning_rate = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=1, decay_rate=0.5)
        lrs = [0.5 * 0.5**t for t in range(3)]
    else:
        learning_rate, lrs = 0.5, [0.5] * 3
    optimizer = LARS(learning_rate, momentum=0.9, weight_decay=weight_decay, trust_coefficient=0.02)
    variables = [keras.Variable(w) for w in initial]
    for grads in steps:
        optimizer.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in grads], variables))
    expected = lars_reference(initial, steps, lrs, 0.9, weight_decay, 0.02)
    for variable, want in zip(variables, expected):
        got = to_numpy(variable)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, **TOL)
    if weight_decay == 0.0:
        # The zero-gradient kernel has d = 0 -> q = 1 -> it does not move.
        np.testing.assert_array_equal(to_numpy(variables[2]), initial[2])


def test_lars_on_a_dense_layer_and_base_decay_is_off():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    kernel, bias = model.layers[0].kernel, model.layers[0].bias
    initial = [to_numpy(kernel).copy(), to_numpy(bias).copy()]
    optimizer = LARS(0.1, weight_decay=0.1)
    assert optimizer.weight_decay is None and optimizer.lars_weight_decay == 0.1
    steps = fixed_gradients([(3, 2), (2,)], 3, seed=3)
    for grads in steps:
        optimizer.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in grads], [kernel, bias]))
    expected = lars_reference(initial, steps, [0.1] * 3, 0.9, 0.1, 0.001)
    np.testing.assert_allclose(to_numpy(kernel), expected[0], **TOL)
    np.testing.assert_allclose(to_numpy(bias), expected[1], **TOL)


def test_lars_config_round_trip():
    optimizer = LARS(0.3, momentum=0.8, weight_decay=0.05, trust_coefficient=0.01, clipnorm=1.0)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, LARS)
    assert restored.momentum == 0.8 and restored.lars_weight_decay == 0.05
    assert restored.trust_coefficient == 0.01 and restored.clipnorm == 1.0
    assert restored.weight_decay is None
    assert float(to_numpy(restored.learning_rate)) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        LARS(momentum=1.0)


# -- LayerDecayAdamW ----------------------------------------------------------------------------
def adamw_reference(weights, gradient_steps, lr, scales, decayed, weight_decay, beta_1, beta_2,
                    epsilon=1e-7):
    """PyTorch-style AdamW per variable with lr `lr * scale`; Keras' epsilon placement:
    `w -= alpha * m / (sqrt(v) + eps)`, `alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)`."""
    weights = [w.astype("float64") for w in weights]
    ms = [np.zeros_like(w) for w in weights]
    vs = [np.zeros_like(w) for w in weights]
    for t, grads in enumerate(gradient_steps, start=1):
        for i, g in enumerate(grads):
            g = g.astype("float64")
            lr_i = lr * scales[i]
            if decayed[i]:
                weights[i] = weights[i] - lr_i * weight_decay * weights[i]
            ms[i] = ms[i] + (g - ms[i]) * (1 - beta_1)
            vs[i] = vs[i] + (g * g - vs[i]) * (1 - beta_2)
            alpha = lr_i * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
            weights[i] = weights[i] - alpha * ms[i] / (np.sqrt(vs[i]) + epsilon)
    return weights


def make_variables(seed=4):
    rng = np.random.default_rng(seed)
    initial = [
        rng.normal(size=(3, 2)).astype("float32"),
        rng.normal(size=(2, 2)).astype("float32"),
        rng.normal(size=(2,)).astype("float32"),
    ]
    names = ["scaled", "unscaled", "excluded"]
    return initial, [keras.Variable(w, name=n) for w, n in zip(initial, names)]


def run(optimizer, variables, steps, exclude):
    optimizer.exclude_from_weight_decay(var_list=exclude)
    for grads in steps:
        optimizer.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in grads], variables))
    return [to_numpy(v) for v in variables]


def test_layer_decay_adamw_matches_numpy_reference():
    initial, variables = make_variables()
    steps = fixed_gradients([w.shape for w in initial], 3, seed=5)
    scales = {variables[0].path: 0.5, variables[1].path: 1.0, variables[2].path: 0.5}
    optimizer = LayerDecayAdamW(0.1, lr_scales=scales, weight_decay=0.3, beta_1=0.9, beta_2=0.95)
    assert type(optimizer) is LayerDecayAdamW  # not swapped for torch's fused AdamW
    got = run(optimizer, variables, steps, exclude=[variables[2]])
    expected = adamw_reference(initial, steps, 0.1, [0.5, 1.0, 0.5], [True, True, False], 0.3, 0.9, 0.95)
    for g, want in zip(got, expected):
        np.testing.assert_allclose(g, want, **TOL)
    # The scales matter (the reference with all scales 1 is far away).
    unscaled = adamw_reference(initial, steps, 0.1, [1.0] * 3, [True, True, False], 0.3, 0.9, 0.95)
    assert np.abs(got[0] - unscaled[0]).max() > 1e-2
    assert np.abs(got[2] - unscaled[2]).max() > 1e-2


def test_layer_decay_adamw_with_unit_scales_is_keras_adamw():
    initial, variables = make_variables(seed=6)
    steps = fixed_gradients([w.shape for w in initial], 3, seed=7)
    ours = run(
        LayerDecayAdamW(0.05, lr_scales={variables[1].path: 1.0}, weight_decay=0.2),
        variables, steps, exclude=[variables[2]],
    )
    _, reference_variables = make_variables(seed=6)
    theirs = run(
        keras.optimizers.AdamW(0.05, weight_decay=0.2),
        reference_variables, steps, exclude=[reference_variables[2]],
    )
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, **TOL)


def test_layer_decay_adamw_config_round_trip():
    scales = {"encoder/block_0/fc1/kernel": 0.64, "encoder/norm/gamma": 1.0}
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, 100)
    optimizer = LayerDecayAdamW(schedule, lr_scales=scales, weight_decay=0.05, beta_2=0.95,
                                global_clipnorm=3.0)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, LayerDecayAdamW)
    assert restored.lr_scales == scales
    assert restored.weight_decay == 0.05 and restored.beta_2 == 0.95 and restored.global_clipnorm == 3.0
    assert isinstance(restored._learning_rate, keras.optimizers.schedules.CosineDecay)


# -- model.fit and .keras saving ----------------------------------------------------------------
def small_model():
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="relu", name="hidden"),
         keras.layers.Dense(2, name="head")]
    )


@pytest.mark.parametrize("kind", ["lars", "layer_decay_adamw"])
def test_fit_and_keras_round_trip(kind, tmp_path):
    model = small_model()
    if kind == "lars":
        optimizer = LARS(0.1, weight_decay=1e-4)
    else:
        scales = {model.layers[0].kernel.path: 0.5, model.layers[0].bias.path: 0.25}
        optimizer = LayerDecayAdamW(1e-2, lr_scales=scales, weight_decay=0.05)
        optimizer.exclude_from_weight_decay(var_list=[model.layers[0].bias, model.layers[1].bias])
    model.compile(optimizer=optimizer, loss="mse")
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = np.random.default_rng(1).normal(size=(8, 2)).astype("float32")
    before = [to_numpy(v).copy() for v in model.trainable_variables]
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert int(to_numpy(optimizer.iterations)) == 2
    after = [to_numpy(v) for v in model.trainable_variables]
    assert all(np.all(np.isfinite(a)) for a in after)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(after, before))

    path = str(tmp_path / f"{kind}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer) is type(optimizer)
    assert loaded.optimizer.get_config() == optimizer.get_config()
    if kind == "layer_decay_adamw":
        assert loaded.optimizer.lr_scales == optimizer.lr_scales
        # The reloaded weights may have other paths ("hidden/kernel" vs "sequential_2/hidden/kernel"):
        # the scales and the weight-decay exclusion must still reach them.
        hidden, head = loaded.layers
        assert loaded.optimizer.lr_scale(hidden.kernel) == 0.5
        assert loaded.optimizer.lr_scale(hidden.bias) == 0.25
        assert loaded.optimizer.lr_scale(head.kernel) == 1.0
        assert not loaded.optimizer._use_weight_decay(hidden.bias)
        assert not loaded.optimizer._use_weight_decay(head.bias)
        assert loaded.optimizer._use_weight_decay(hidden.kernel)
    np.testing.assert_allclose(to_numpy(loaded.predict(x, verbose=0)), to_numpy(model.predict(x, verbose=0)),
                               rtol=1e-6, atol=1e-6)
    for a, b in zip(loaded.optimizer.variables, optimizer.variables):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    # Training resumes exactly as it would have continued.
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    assert int(to_numpy(loaded.optimizer.iterations)) == 4
    for a, b in zip(loaded.trainable_variables, model.trainable_variables):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), **TOL)


def test_lr_scales_path_matching():
    optimizer = LayerDecayAdamW(lr_scales={"model/enc/block_0/kernel": 0.5, "enc/norm/gamma": 0.9})
    cases = {
        "model/enc/block_0/kernel": 0.5,  # exact
        "enc/block_0/kernel": 0.5,  # the reloaded path lost a leading component
        "outer/model/enc/block_0/kernel": 0.5,  # nested one level deeper
        "xenc/block_0/kernel": 1.0,  # not a whole component
        "model/enc/norm/gamma": 0.9,
        "model/enc/block_1/kernel": 1.0,
    }
    for path, scale in cases.items():
        assert optimizer.lr_scale(SimpleNamespace(path=path)) == scale, path
    ambiguous = LayerDecayAdamW(lr_scales={"a/dense/kernel": 0.5, "b/dense/kernel": 0.25})
    with pytest.raises(ValueError, match="several"):
        ambiguous.lr_scale(SimpleNamespace(path="dense/kernel"))
    with pytest.warns(UserWarning, match="no variable"):
        LayerDecayAdamW(lr_scales={"elsewhere/kernel": 0.5}).build([keras.Variable(np.zeros(2), name="w")])


def test_no_decay_paths_from_config():
    """An exclusion given by path (as after deserialisation) is resolved in `build`."""
    initial, variables = make_variables(seed=8)
    steps = fixed_gradients([w.shape for w in initial], 3, seed=9)
    optimizer = LayerDecayAdamW(0.1, weight_decay=0.3, beta_2=0.95, no_decay_paths=[variables[1].path])
    for grads in steps:
        optimizer.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in grads], variables))
    expected = adamw_reference(initial, steps, 0.1, [1.0] * 3, [True, False, True], 0.3, 0.9, 0.95)
    for variable, want in zip(variables, expected):
        np.testing.assert_allclose(to_numpy(variable), want, **TOL)


# -- layer_decay_scales -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit():
    encoder = backbones.get_backbone("vit_tiny", image_size=32, patch_size=8, depth=2)
    encoder.build((None, 32, 32, 3))  # creates the same variables as a call, without the eager forward
    return encoder


def test_layer_decay_scales_vit(vit):
    scales = layer_decay_scales(vit, 0.8)
    assert set(scales) >= {v.path for v in vit.trainable_variables}
    assert len(scales) == len(vit.variables)
    expected_by_prefix = [
        ("patch_embedding/", 0.8**3), ("cls_token", 0.8**3), ("position_embedding", 0.8**3),
        ("block_0/", 0.8**2), ("block_1/", 0.8), ("norm/", 1.0),
    ]
    for path, scale in scales.items():
        local = path.split("/", 1)[1]
        matches = [want for prefix, want in expected_by_prefix if local.startswith(prefix)]
        assert len(matches) == 1, path
        assert scale == pytest.approx(matches[0]), path
    assert scales[vit.patch_embedding.kernel.path] == pytest.approx(0.512)
    assert scales[vit.norm.gamma.path] == 1.0
    assert layer_decay_scales(vit, 1.0) == {p: 1.0 for p in scales}


def test_layer_decay_scales_with_a_head_and_the_optimizer(vit):
    head = keras.layers.Dense(3, name="probe_head")
    head.build((None, vit.hidden_dim))
    scales = layer_decay_scales(vit, 0.5)
    assert head.kernel.path not in scales
    optimizer = LayerDecayAdamW(1e-3, lr_scales=scales)
    assert optimizer.lr_scale(head.kernel) == 1.0
    assert optimizer.lr_scale(vit.blocks[0].variables[0]) == pytest.approx(0.25)
    assert optimizer.lr_scale(vit.cls_token) == pytest.approx(0.125)


def test_layer_decay_scales_resnet_and_invalid_decay(vit):
    resnet = backbones.get_backbone("resnet50", image_size=32)  # no forward pass needed (slow on JAX)
    assert layer_decay_scales(resnet, 0.75) == {}
    for bad in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError):
            layer_decay_scales(vit, bad)
    unbuilt = backbones.get_backbone("vit_tiny", image_size=32, patch_size=8, depth=1)
    with pytest.raises(ValueError):
        layer_decay_scales(unbuilt, 0.5)


def test_backend_is_known():
    assert BACKEND in ("tensorflow", "jax", "torch")
