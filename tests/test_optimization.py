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


def numpy_adamw(weights, grads_per_step, lrs, weight_decay, decayed, beta_1, beta_2, eps, clip, torch_eps=True):
    """The recipe's update written from the formulas: global-norm clipping, decoupled decay, Adam
    (epsilon after the bias correction as PyTorch, or before it as Keras with `torch_eps=False`)."""
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
            if torch_eps:
                weights[i] -= lr * (m[i] / (1 - beta_1**step)) / (np.sqrt(v[i] / (1 - beta_2**step)) + eps)
            else:
                alpha = lr * math.sqrt(1 - beta_2**step) / (1 - beta_1**step)
                weights[i] -= alpha * m[i] / (np.sqrt(v[i]) + eps)
    return weights


def _run_optimizer(make, start, grads, fused=None, monkeypatch=None):
    """Applies `grads` (a list per step) with `make()` to fresh variables; `fused=False` forces
    the plain Keras path on PyTorch. Returns (weights, optimizer)."""
    variables = [keras.Variable(w, name=f"w{i}") for i, w in enumerate(start)]
    optimizer = make()
    if fused is False:
        monkeypatch.setattr(optimizer, "_fused_path", lambda: False)
    optimizer.build(variables)
    optimizer.exclude_from_weight_decay(var_list=[variables[1]])
    for step_grads in grads:
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in step_grads], variables)
    return [to_numpy(v) for v in variables], optimizer


def _grads(seed=0, steps=6, small=False):
    rng = np.random.default_rng(seed)
    shapes = [(5, 4), (4,), (3, 3, 2)]
    start = [rng.standard_normal(s).astype("float32") for s in shapes]
    # `small`: gradients of 1e-5..1e-4, as attention weights get at initialisation, where the
    # epsilon convention decides the update.
    scale = (lambda t: 1e-4 if t % 2 else 1e-5) if small else (lambda t: 3.0 if t % 2 else 0.05)
    grads = [[(rng.standard_normal(s) * scale(t)).astype("float32") for s in shapes] for t in range(steps)]
    return start, grads


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_adamw_matches_numpy_reference_and_keras_convention(clip, fused, monkeypatch):
    """`optimization.AdamW` == the formulas with PyTorch's epsilon; with `bias_corrected_epsilon=False`
    == `keras.optimizers.AdamW`; over steps where clipping acts and where it does not, with excluded
    variables and a schedule, on the fused PyTorch path and on Keras' plain path."""
    if fused and BACKEND != "torch":
        pytest.skip("the fused path exists on the PyTorch backend only")
    start, grads = _grads()
    schedule = optimization.warmup_cosine_schedule(1e-2, 20, 3)
    calls = []
    if BACKEND == "torch":
        from keras_mfm.backend.torch import adamw as fused_adamw_torch

        original = fused_adamw_torch.adamw_step
        monkeypatch.setattr(fused_adamw_torch, "adamw_step", lambda *a, **k: calls.append(1) or original(*a, **k))
    options = dict(learning_rate=schedule, weight_decay=0.05, beta_1=0.9, beta_2=0.95, global_clipnorm=clip or None)
    ours, optimizer = _run_optimizer(lambda: optimization.AdamW(**options), start, grads, fused, monkeypatch)
    assert optimizer.epsilon == 1e-8 and optimizer.bias_corrected_epsilon
    lrs = [float(to_numpy(schedule(t))) for t in range(len(grads))]
    expected = numpy_adamw(start, grads, lrs, 0.05, [True, False, True], 0.9, 0.95, 1e-8, clip)
    for got, want in zip(ours, expected):
        np.testing.assert_allclose(got, want, atol=2e-6)
    assert int(to_numpy(optimizer.iterations)) == len(grads)
    assert len(calls) == (len(grads) if fused else 0)  # the fused path ran iff asked
    # Keras' convention on request, equal to Keras' own AdamW
    keras_options = dict(options, epsilon=1e-7)
    keras_weights, _ = _run_optimizer(lambda: keras.optimizers.AdamW(**keras_options), start, grads)
    ours_keras, _ = _run_optimizer(
        lambda: optimization.AdamW(bias_corrected_epsilon=False, **keras_options), start, grads, fused, monkeypatch)
    keras_expected = numpy_adamw(start, grads, lrs, 0.05, [True, False, True], 0.9, 0.95, 1e-7, clip, torch_eps=False)
    for got, keras_value, want in zip(ours_keras, keras_weights, keras_expected):
        np.testing.assert_allclose(got, keras_value, atol=2e-7)
        np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_default_optimizer_equals_torch_adamw(clip, fused, monkeypatch):
    """The library's default optimiser, 5 steps, against `torch.optim.AdamW(eps=1e-8)` (+
    `clip_grad_norm_`, as both authors' codes) with the same weights, gradients and learning
    rates: the update of every variable within 1e-4 (relative), also for the small gradients
    where Keras' own epsilon convention is 10-40 % off."""
    torch = pytest.importorskip("torch")
    if fused and BACKEND != "torch":
        pytest.skip("the fused path exists on the PyTorch backend only")
    for small in (False, True):
        start, grads = _grads(seed=1, steps=5, small=small)
        # weights of 0.01 (float32 keeps their updates to ~1e-6); clipping only where the global
        # norm is >> 1e-6 (PyTorch's `clip_grad_norm_` divides by `norm + 1e-6`, Keras by `norm`)
        start = [w * 0.01 for w in start]
        clip_norm = 0.0 if small else clip
        lrs = [1e-3 * (t + 1) / 5 for t in range(5)]
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay(list(range(4)), lrs)  # step t -> lrs[t]
        ours, _ = _run_optimizer(
            lambda: optimization.AdamW(learning_rate=schedule, weight_decay=0.05, beta_1=0.9, beta_2=0.95,
                                       global_clipnorm=clip_norm or None),
            start, grads, fused, monkeypatch)
        params = [torch.nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in start]
        reference = torch.optim.AdamW([
            {"params": [params[0], params[2]], "weight_decay": 0.05},
            {"params": [params[1]], "weight_decay": 0.0},
        ], lr=lrs[0], betas=(0.9, 0.95), eps=1e-8)
        for step_grads, lr in zip(grads, lrs):
            for group in reference.param_groups:
                group["lr"] = lr
            for p, g in zip(params, step_grads):
                p.grad = torch.tensor(g, dtype=torch.float64)
            if clip_norm:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            reference.step()
        for got, p, w0 in zip(ours, params, start):
            want = p.detach().numpy() - w0
            update = got.astype("float64") - w0
            assert np.linalg.norm(update - want) <= 1e-4 * np.linalg.norm(want), (small, clip)


def test_adamw_options_outside_the_fused_path_still_apply():
    """Per-variable `clipnorm` is not fused: it must take Keras' path and still clip."""
    variable = keras.Variable(np.zeros((3,), "float32"))
    ours = optimization.AdamW(learning_rate=0.1, weight_decay=0.0, clipnorm=1e-3, epsilon=1e-7,
                              bias_corrected_epsilon=False)
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


def test_amsgrad_needs_keras_epsilon_convention():
    with pytest.raises(ValueError, match="amsgrad=True"):
        optimization.AdamW(amsgrad=True)
    assert optimization.AdamW(amsgrad=True, bias_corrected_epsilon=False).amsgrad
