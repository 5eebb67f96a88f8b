"""Each method trains as its authors do: init scheme, recipe, schedule, weight-decay rule.

The expected numbers are written here from the authors' code and configs (MFM's ViT-B 300-epoch
config and `main_mfm.py`; MAE's `main_pretrain.py`, `util/lr_sched.py`, `models_mae.py`; SimMIM's
ViT-B 800-epoch config, `main_simmim.py`, `lr_scheduler.py`; timm's ResNet), not read back from
keras_mfm's tables."""

import math

import keras
import numpy as np
import pytest

from keras_mfm import backbones, methods, optimization, training
from keras_mfm.layers import initializers
from tests.conftest import to_numpy

#: std of a normal truncated at +-1 std, in units of that std: sqrt(1 - 2 phi(1) / (2 Phi(1) - 1))
CUT_AT_ONE_STD = 0.5399


def vit(init, size=224, patch=16, dim=768, heads=12, depth=2, **options):
    encoder = backbones.ViTBackbone(image_size=size, patch_size=patch, hidden_dim=dim, depth=depth,
                                    num_heads=heads, init=init, **options)
    encoder.ensure_built()
    return encoder


def std(weight):
    return float(np.std(to_numpy(weight)))


def test_truncated_normal_cut_at_one_std():
    values = to_numpy(initializers.TruncatedNormal(0.02, seed=0)((200_000,)))
    assert np.abs(values).max() <= 0.02
    assert np.std(values) == pytest.approx(0.02 * CUT_AT_ONE_STD, rel=0.01)
    assert abs(np.mean(values)) < 1e-4
    restored = initializers.TruncatedNormal.from_config(initializers.TruncatedNormal(0.03, 2.0).get_config())
    assert restored.stddev == 0.03 and restored.cutoff == 2.0


@pytest.mark.parametrize("init", ["mfm", "simmim"])
def test_beit_style_init_at_vit_b16(init):
    """MFM / SimMIM at ViT-B/16: every Linear, the patch embedding, [CLS] and the learned positions
    truncated normal std 0.02 cut at +-0.02 (std 0.0108); block l's attn.proj and fc2 / sqrt(2 l):
    0.0076 in the first block, 0.0054 in the second."""
    encoder = vit(init)
    assert std(encoder.patch_embedding.kernel) == pytest.approx(0.0108, rel=0.01)
    np.testing.assert_array_equal(to_numpy(encoder.patch_embedding.bias), 0.0)
    assert np.abs(to_numpy(encoder.patch_embedding.kernel)).max() <= 0.02
    for weight in (encoder.cls_token, encoder.position_embedding):
        assert std(weight) == pytest.approx(0.0108, rel=0.08)
    for layer_id, block in enumerate(encoder.blocks, start=1):
        assert std(block.attention.qkv.kernel) == pytest.approx(0.0108, rel=0.01)
        assert std(block.fc1.kernel) == pytest.approx(0.0108, rel=0.01)
        for residual in (block.attention.proj.kernel, block.fc2.kernel):
            assert std(residual) == pytest.approx(0.0108 / math.sqrt(2 * layer_id), rel=0.01)
        np.testing.assert_array_equal(to_numpy(block.fc2.bias), 0.0)
    assert std(encoder.blocks[1].fc2.kernel) == pytest.approx(0.0054, rel=0.01)


def test_mae_init_at_vit_b16_and_vit_t4():
    """MAE: xavier-uniform of the patch kernel viewed as a (D, p*p*3) matrix: std 0.0361 at
    ViT-B/16, 0.0913 at ViT-T/4 (Keras' Glorot on the 4-D kernel gives 0.0032 and 0.0253);
    every Linear xavier-uniform; [CLS] normal std 0.02 (not truncated)."""
    base = vit("mae", position_embedding="sincos")
    assert std(base.patch_embedding.kernel) == pytest.approx(math.sqrt(2 / (768 + 768)), rel=0.01)
    assert std(base.patch_embedding.kernel) == pytest.approx(0.0361, rel=0.01)
    bias = to_numpy(base.patch_embedding.bias)  # PyTorch's default conv bias: U(+-1/sqrt(768))
    assert np.abs(bias).max() <= 1 / math.sqrt(768) and np.std(bias) > 0.5 / math.sqrt(3 * 768)
    qkv = base.blocks[0].attention.qkv.kernel
    assert std(qkv) == pytest.approx(math.sqrt(2 / (768 + 3 * 768)), rel=0.01)
    assert std(base.blocks[1].fc2.kernel) == pytest.approx(math.sqrt(2 / (3072 + 768)), rel=0.01)
    assert std(base.cls_token) == pytest.approx(0.02, rel=0.12)
    tiny = vit("mae", size=32, patch=4, dim=192, heads=3)
    assert std(tiny.patch_embedding.kernel) == pytest.approx(math.sqrt(2 / (48 + 192)), rel=0.02)
    assert std(tiny.patch_embedding.kernel) == pytest.approx(0.0913, rel=0.02)


def test_simmim_encoder_options_and_heads():
    """SimMIM pre-trains with layer scale 0.1 and drop path 0.1; the MFM and SimMIM heads keep
    PyTorch's default init (U(+-1/sqrt(fan_in)) for kernel and bias)."""
    config = training.PretrainConfig(method="simmim", image_size=32, patch_size=4, depth=2)
    encoder = training.build_encoder(config)
    assert encoder.init == "simmim" and encoder.layer_scale == 0.1 and encoder.drop_path_rate == 0.1
    encoder.ensure_built()
    block = encoder.blocks[0]
    np.testing.assert_allclose(to_numpy(block.layer_scale_1), 0.1)
    model = methods.build_method("simmim", encoder)
    model.build()
    kernel, bias = to_numpy(model.head.kernel), to_numpy(model.head.bias)
    assert np.abs(kernel).max() <= 1 / math.sqrt(192) and np.abs(bias).max() <= 1 / math.sqrt(192)
    assert np.std(kernel) == pytest.approx(1 / math.sqrt(3 * 192), rel=0.05)
    # the SimMIM mask token: truncated normal std 0.02 cut at +-0.02
    assert np.abs(to_numpy(model.mask_token)).max() <= 0.02
    mfm = methods.build_method("mfm", backbones.ViTBackbone(image_size=32, patch_size=4, hidden_dim=192, depth=1,
                                                            num_heads=3, init="mfm"))
    mfm.build((None, 32, 32, 3))
    conv = mfm.head.conv
    assert np.abs(to_numpy(conv.kernel)).max() <= 1 / math.sqrt(192)
    assert np.std(to_numpy(conv.kernel)) == pytest.approx(1 / math.sqrt(3 * 192), rel=0.05)
    assert 0 < np.abs(to_numpy(conv.bias)).max() <= 1 / math.sqrt(192)


@pytest.mark.parametrize("method,init,position", [
    ("mfm", "mfm", "learned"), ("sr", "mfm", "learned"), ("mae", "mae", "sincos"), ("famt", "mae", "sincos"),
    ("amt", "mae", "sincos"), ("simmim", "simmim", "learned"), ("simmim_famt", "simmim", "learned"),
])
def test_each_method_picks_its_authors_init(method, init, position):
    encoder = training.build_encoder(training.PretrainConfig(method=method, image_size=16, patch_size=4, depth=1))
    assert encoder.init == init and encoder.position_embedding_type == position
    override = training.build_encoder(training.PretrainConfig(method=method, image_size=16, patch_size=4, depth=1,
                                                              init="mae"))
    assert override.init == "mae"


def test_init_never_touches_loaded_weights(tmp_path):
    encoder = vit("mfm", size=16, patch=4, dim=16, heads=2, depth=1)
    encoder.blocks[0].fc2.kernel.assign(np.full((64, 16), 0.5, "float32"))
    path = str(tmp_path / "encoder.keras")
    encoder.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.init == "mfm"
    for saved, restored in zip(encoder.weights, loaded.weights):
        np.testing.assert_array_equal(to_numpy(restored), to_numpy(saved))


def test_unknown_init_and_recipe_are_clear_errors():
    with pytest.raises(ValueError, match="Unknown init scheme 'beit'"):
        backbones.ViTBackbone(image_size=16, patch_size=4, hidden_dim=16, depth=1, num_heads=2, init="beit")
    with pytest.raises(ValueError, match="Unknown recipe 'moco'"):
        optimization.get_recipe("moco")
    with pytest.raises(ValueError, match="Unknown --recipe 'moco'"):
        training.validate(training.PretrainConfig(recipe="moco"))
    with pytest.raises(ValueError, match="Unknown --init 'beit'"):
        training.validate(training.PretrainConfig(init="beit"))


# -- recipes ---------------------------------------------------------------------------------------
AUTHORS = {
    # MFM configs/vit_base/mfm_pretrain__vit_base__img224__300ep.yaml (+ config.py)
    "mfm": dict(base_lr=3e-4, reference_batch_size=512, warmup_lr=2.5e-7, min_lr=2.5e-6, warmup_fraction=20 / 300,
                decay="cosine", warmup_prefix=False, beta_1=0.9, beta_2=0.95, epsilon=1e-8, weight_decay=0.05,
                clip_norm=3.0),
    # MAE main_pretrain.py with the paper's blr 1.5e-4; util/lr_sched.py; no clip_grad in engine_pretrain.py
    "mae": dict(base_lr=1.5e-4, reference_batch_size=256, warmup_lr=0.0, min_lr=0.0, warmup_fraction=40 / 400,
                decay="cosine", warmup_prefix=True, beta_1=0.9, beta_2=0.95, epsilon=1e-8, weight_decay=0.05,
                clip_norm=0.0),
    # SimMIM configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml (+ config.py)
    "simmim": dict(base_lr=1e-4, reference_batch_size=512, warmup_lr=5e-7, warmup_fraction=10 / 800,
                   decay="multistep", milestones=(700 / 800,), gamma=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                   weight_decay=0.05, clip_norm=5.0),
}
METHOD_RECIPES = {"mfm": "mfm", "sr": "mfm", "deblur": "mfm", "denoise": "mfm", "mae": "mae", "amt": "mae",
                  "famt": "mae", "simmim": "simmim", "simmim_famt": "simmim"}


@pytest.mark.parametrize("method", sorted(METHOD_RECIPES))
def test_default_recipes_are_the_authors(method):
    assert methods.get_method(method).recipe == METHOD_RECIPES[method]
    recipe = training.recipe_of(training.PretrainConfig(method=method))
    for field, value in AUTHORS[METHOD_RECIPES[method]].items():
        assert getattr(recipe, field) == pytest.approx(value), field


def _timm_cosine(t, peak, total, warmup, warmup_lr, min_lr):
    """timm 0.4.12's CosineLRScheduler as MFM builds it (t_initial = total steps, no warmup prefix)."""
    if t < warmup:
        return warmup_lr + t * (peak - warmup_lr) / warmup
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t / total))


def _mae_lr(t, peak, total, warmup, min_lr=0.0):
    """MAE's `adjust_learning_rate` at the fractional epoch t / steps_per_epoch."""
    if t < warmup:
        return peak * t / warmup
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def _simmim_lr(t, peak, warmup, warmup_lr, milestones, gamma=0.1):
    if t < warmup:
        return warmup_lr + t * (peak - warmup_lr) / warmup
    return peak * gamma ** sum(t >= m for m in milestones)


def test_schedules_follow_the_authors_schedulers():
    batch, total = 128, 3000
    mfm = optimization.RECIPES["mfm"].schedule(batch, total)
    peak = 3e-4 * batch / 512
    assert mfm.warmup_steps == 200
    for t in (0, 1, 100, 199, 200, 201, 1500, 2999, 3000):
        want = _timm_cosine(t, peak, total, 200, 2.5e-7 * batch / 512, 2.5e-6 * batch / 512)
        assert float(to_numpy(mfm(t))) == pytest.approx(want, rel=1e-5)
    mae = optimization.RECIPES["mae"].schedule(batch, total)
    for t in (0, 1, 150, 299, 300, 301, 1500, 2999, 3000):
        want = _mae_lr(t, 1.5e-4 * batch / 256, total, 300)
        assert float(to_numpy(mae(t))) == pytest.approx(want, rel=1e-5, abs=1e-12)
    simmim = optimization.RECIPES["simmim"].schedule(batch, 8000)
    for t in (0, 50, 99, 100, 6999, 7000, 7999):
        want = _simmim_lr(t, 1e-4 * batch / 512, 100, 5e-7 * batch / 512, [7000])
        assert float(to_numpy(simmim(t))) == pytest.approx(want, rel=1e-5)
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(mfm))
    assert isinstance(restored, optimization.WarmupSchedule) and restored.get_config() == mfm.get_config()


def test_flags_override_the_recipe_and_min_lr_is_absolute():
    config = training.PretrainConfig(method="famt", batch_size=64, lr=1e-3, min_lr=1e-5, clip_norm=1.0,
                                     weight_decay=0.1, recipe="mfm")
    recipe = training.recipe_of(config)
    assert recipe.name == "mfm" and recipe.learning_rate(64) == 1e-3 and recipe.clip_norm == 1.0
    assert recipe.weight_decay == 0.1
    assert recipe.schedule(64, 100).min_lr == pytest.approx(1e-5)


def _decayed(method):
    model = training.build_model(training.PretrainConfig(
        method=method, image_size=16, patch_size=4, depth=1, decoder_dim=16, decoder_depth=1, decoder_heads=2),
        num_images=4)
    recipe = training.recipe_of(training.PretrainConfig(method=method))
    optimizer = optimization.build_optimizer(model, recipe, 8, total_steps=10)
    return {v.path.split("/")[-1] for v in model.trainable_variables if optimizer._use_weight_decay(v)}


def test_weight_decay_rules_per_method():
    """MAE decays [CLS] and the mask token (only rank <= 1 is excluded); MFM excludes [CLS] and the
    position embedding; SimMIM excludes them too but decays its mask token."""
    mae = _decayed("mae")
    assert "cls_token" in mae and "mask_token" in mae and "bias" not in mae and "gamma" not in mae
    mfm = _decayed("mfm")
    assert "cls_token" not in mfm and "position_embedding" not in mfm and "kernel" in mfm
    simmim = _decayed("simmim")
    assert "cls_token" not in simmim and "position_embedding" not in simmim and "mask_token" in simmim
    assert "layer_scale_1" not in simmim
