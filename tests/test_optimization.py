import math

import keras
import numpy as np
import pytest

from keras_mfm import backbones, optimization
from keras_mfm.models import MFM
from tests.conftest import BACKEND, to_numpy


def reference_lr(step, peak, total, warmup, min_lr):
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup", [0, 10])
def test_warmup_cosine_schedule(warmup):
    schedule = optimization.warmup_cosine_schedule(1e-3, 100, warmup, min_lr=2.5e-6)
    for step in [0, 1, 5, 10, 11, 50, 99, 100]:
        if warmup == 0 and step == 0:
            continue
        got = float(to_numpy(schedule(step)))
        assert got == pytest.approx(reference_lr(step, 1e-3, 100, warmup, 2.5e-6), rel=1e-4, abs=1e-9)


def test_scaled_learning_rate_and_recipe():
    assert optimization.scaled_learning_rate(3e-4, 128) == pytest.approx(7.5e-5)
    assert optimization.Recipe().learning_rate(1024) == pytest.approx(6e-4)
    assert optimization.Recipe(lr=0.01).learning_rate(1024) == 0.01


def test_no_weight_decay_variables():
    model = MFM(backbones.ViTBackbone(image_size=8, patch_size=4, hidden_dim=8, depth=1, num_heads=2))
    model.build((None, 8, 8, 3))
    excluded = {v.path for v in optimization.no_weight_decay_variables(model)}
    assert any("cls_token" in p for p in excluded) and any("position_embedding" in p for p in excluded)
    assert all(("kernel" not in p) for p in excluded)
    assert any("norm1/gamma" in p for p in excluded) and any("qkv/bias" in p for p in excluded)


def test_weight_decay_skips_excluded_variables():
    """With zero gradients AdamW only decays: kernels shrink, biases/norms/[CLS] do not move."""
    model = MFM(backbones.ViTBackbone(image_size=8, patch_size=4, hidden_dim=8, depth=1, num_heads=2))
    model.build((None, 8, 8, 3))
    recipe = optimization.Recipe(lr=0.1, weight_decay=0.5, clip_norm=0)
    optimizer = optimization.build_optimizer(model, recipe, batch_size=8, total_steps=10, warmup_steps=0)
    variables = model.trainable_variables
    before = [to_numpy(v).copy() for v in variables]
    optimizer.apply([keras.ops.zeros(v.shape) for v in variables], variables)
    excluded = {id(v) for v in optimization.no_weight_decay_variables(model)}
    for variable, old in zip(variables, before):
        new = to_numpy(variable)
        if id(variable) in excluded:
            np.testing.assert_array_equal(new, old)
        elif np.abs(old).max() > 0:
            np.testing.assert_allclose(new, old * (1 - 0.1 * 0.5), rtol=1e-5)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="warmup_steps"):
        optimization.warmup_cosine_schedule(1e-3, 10, 20)
    with pytest.raises(ValueError, match="learning rate"):
        optimization.warmup_cosine_schedule(0.0, 10, 2)


def numpy_adamw(weights, grads_per_step, lrs, weight_decay, decayed, beta_1, beta_2, eps, clip):
    """The recipe's update written from the formulas: global-norm clipping, decoupled decay, Adam."""
    weights = [w.astype("float64").copy() for w in weights]
    m = [np.zeros_like(w) for w in weights]
    v = [np.zeros_like(w) for w in weights]
    for step, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        grads = [g.astype("float64") for g in grads]
        if clip:
            norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
            grads = [g * clip / max(norm, clip) for g in grads]
        for i, g in enumerate(grads):
            if decayed[i]:
                weights[i] *= 1 - lr * weight_decay
            m[i] = beta_1 * m[i] + (1 - beta_1) * g
            v[i] = beta_2 * v[i] + (1 - beta_2) * g**2
            alpha = lr * math.sqrt(1 - beta_2**step) / (1 - beta_1**step)
            weights[i] -= alpha * m[i] / (np.sqrt(v[i]) + eps)
    return weights


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_adamw_matches_keras_and_numpy_reference(clip, monkeypatch):
    """`optimization.AdamW` (PyTorch: one fused kernel) == `keras.optimizers.AdamW` == the formulas,
    over steps where clipping acts and where it does not, with excluded variables and a schedule."""
    rng = np.random.default_rng(0)
    shapes = [(5, 4), (4,), (3, 3, 2)]
    start = [rng.standard_normal(s).astype("float32") for s in shapes]
    grads = [[(rng.standard_normal(s) * (3.0 if t % 2 else 0.05)).astype("float32") for s in shapes]
             for t in range(6)]
    schedule = optimization.warmup_cosine_schedule(1e-2, 20, 3)
    calls = []
    if BACKEND == "torch":
        from keras_mfm import fused_adamw_torch

        original = fused_adamw_torch.adamw_step
        monkeypatch.setattr(fused_adamw_torch, "adamw_step", lambda *a, **k: calls.append(1) or original(*a, **k))

    def run(cls):
        variables = [keras.Variable(w, name=f"w{i}") for i, w in enumerate(start)]
        optimizer = cls(learning_rate=schedule, weight_decay=0.05, beta_1=0.9, beta_2=0.95,
                        global_clipnorm=clip or None)
        optimizer.build(variables)
        optimizer.exclude_from_weight_decay(var_list=[variables[1]])
        for step_grads in grads:
            optimizer.apply([keras.ops.convert_to_tensor(g) for g in step_grads], variables)
        return [to_numpy(v) for v in variables], optimizer

    keras_weights, _ = run(keras.optimizers.AdamW)
    ours, optimizer = run(optimization.AdamW)
    lrs = [float(to_numpy(schedule(t))) for t in range(len(grads))]
    expected = numpy_adamw(start, grads, lrs, 0.05, [True, False, True], 0.9, 0.95, optimizer.epsilon, clip)
    for got, keras_value, want in zip(ours, keras_weights, expected):
        np.testing.assert_allclose(got, keras_value, atol=2e-7)
        np.testing.assert_allclose(got, want, atol=2e-6)
    assert int(to_numpy(optimizer.iterations)) == len(grads)
    assert len(calls) == (len(grads) if BACKEND == "torch" else 0)  # the fused path ran on PyTorch


def test_adamw_options_outside_the_fused_path_still_apply():
    """Per-variable `clipnorm` is not fused: it must take Keras' path and still clip."""
    variable = keras.Variable(np.zeros((3,), "float32"))
    ours = optimization.AdamW(learning_rate=0.1, weight_decay=0.0, clipnorm=1e-3)
    plain = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.0, clipnorm=1e-3)
    other = keras.Variable(np.zeros((3,), "float32"))
    grad = np.array([1.0, -2.0, 3.0], "float32")
    for _ in range(3):
        ours.apply([keras.ops.convert_to_tensor(grad)], [variable])
        plain.apply([keras.ops.convert_to_tensor(grad)], [other])
    np.testing.assert_allclose(to_numpy(variable), to_numpy(other), atol=1e-7)


def test_adamw_serialises_and_is_the_recipe_optimizer():
    model = MFM(backbones.ViTBackbone(image_size=8, patch_size=4, hidden_dim=8, depth=1, num_heads=2))
    model.build((None, 8, 8, 3))
    optimizer = optimization.build_optimizer(model, optimization.Recipe(), 8, total_steps=10)
    assert isinstance(optimizer, optimization.AdamW)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is optimization.AdamW
    assert restored.get_config()["global_clipnorm"] == 3.0 and restored.get_config()["beta_2"] == 0.95
