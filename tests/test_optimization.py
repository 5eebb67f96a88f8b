import math

import keras
import numpy as np
import pytest

from keras_mfm import backbones, optimization
from keras_mfm.models import MFM
from tests.conftest import to_numpy


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
