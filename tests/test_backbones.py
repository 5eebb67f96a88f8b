import math
import os

import keras
import numpy as np
import pytest

from keras_mfm import backbones
from keras_mfm.layers.position_embedding import sincos_2d
from keras_mfm.layers.transformer import MultiHeadSelfAttention
from tests.conftest import BACKEND, to_numpy
from tests.harness import check_model_saving


def small_vit(**kwargs):
    arguments = dict(image_size=16, patch_size=4, hidden_dim=32, depth=2, num_heads=4)
    arguments.update(kwargs)
    return backbones.ViTBackbone(**arguments)


def images(n=2, size=16, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 3)).astype("float32")


@pytest.mark.parametrize(
    "name,width,depth,heads",
    [("vit_tiny", 192, 12, 3), ("vit_small", 384, 12, 6), ("vit_base", 768, 12, 12)],
)
def test_vit_presets(name, width, depth, heads):
    model = backbones.get_backbone(name, image_size=32, patch_size=8)
    assert (model.hidden_dim, model.depth, model.num_heads, model.patch_size) == (width, depth, heads, 8)
    assert model.name == name


def test_vit_shapes_and_feature_map():
    model = small_vit()
    x = images()
    tokens = model(x)
    assert tuple(tokens.shape) == (2, 17, 32)
    grid = to_numpy(model.feature_map(tokens))
    assert grid.shape == (2, 4, 4, 32)
    np.testing.assert_array_equal(grid[:, 1, 2], to_numpy(tokens)[:, 1 + 1 * 4 + 2])
    assert tuple(model.pooled_features(tokens).shape) == (2, 32)
    assert tuple(model.pooled_features(tokens, "mean").shape) == (2, 32)


def test_vit_token_subset_equals_gathered_patches():
    """Running on a subset = embedding all patches, then keeping those (per image)."""
    model = small_vit()
    x = images(2)
    indices = np.array([[0, 5, 15], [3, 2, 9]], "int32")
    subset = to_numpy(model(x, token_indices=indices))
    assert subset.shape == (2, 4, 32)
    # independent path: embed, gather with NumPy, run the blocks by hand
    embedded = to_numpy(model.embed_patches(x))
    gathered = np.stack([embedded[i, indices[i]] for i in range(2)])
    tokens = model.prepend_cls(keras.ops.convert_to_tensor(gathered))
    for block in model.blocks:
        tokens = block(tokens)
    np.testing.assert_allclose(subset, to_numpy(model.norm(tokens)), atol=1e-5)


def test_vit_attention_path_matches_fused_path():
    model = small_vit()
    x = images(2)
    fused = to_numpy(model(x))
    tokens, attention = model(x, return_attention=True)
    np.testing.assert_allclose(to_numpy(tokens), fused, atol=1e-5)
    attention = to_numpy(attention)
    assert attention.shape == (2, 4, 17, 17)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)


def test_attention_matches_numpy_reference():
    layer = MultiHeadSelfAttention(8, 2)
    x = np.random.default_rng(1).normal(size=(1, 5, 8)).astype("float32")
    out, attention = layer(x, return_attention=True)
    kernel, bias = [to_numpy(w) for w in layer.qkv.weights]
    qkv = (x @ kernel + bias).reshape(1, 5, 3, 2, 4)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(to_numpy(attention), weights, atol=1e-5)
    mixed = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(1, 5, 8)
    proj_kernel, proj_bias = [to_numpy(w) for w in layer.proj.weights]
    np.testing.assert_allclose(to_numpy(out), mixed @ proj_kernel + proj_bias, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer(x)), to_numpy(out), atol=1e-5)


def test_sincos_position_embedding_reference():
    table = sincos_2d(8, (2, 3))
    assert table.shape == (7, 8)
    np.testing.assert_array_equal(table[0], 0)
    # patch (row 1, col 2): first half encodes the column, second half the row; omega = 1, 0.01
    col = [np.sin(2), np.sin(0.02), np.cos(2), np.cos(0.02)]
    row = [np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01)]
    np.testing.assert_allclose(table[1 + 1 * 3 + 2], col + row, atol=1e-6)
    model = small_vit(position_embedding="sincos")
    model(images())
    np.testing.assert_allclose(to_numpy(model.position_embedding)[0], sincos_2d(32, (4, 4)), atol=1e-6)
    assert not model.position_embedding.trainable


@pytest.mark.parametrize("position_embedding", ["learned", "sincos"])
def test_vit_save_load_round_trip(tmp_path, position_embedding):
    model = small_vit(position_embedding=position_embedding, drop_path_rate=0.1)
    loaded = check_model_saving(model, images(), tmp_path)
    assert loaded.position_embedding_type == position_embedding


def test_drop_path_only_in_training():
    model = small_vit(drop_path_rate=0.5)
    x = images()
    np.testing.assert_allclose(to_numpy(model(x)), to_numpy(model(x)), atol=1e-6)
    assert not np.allclose(to_numpy(model(x, training=True)), to_numpy(model(x)), atol=1e-4)


def test_vit_bad_input():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        backbones.ViTBackbone(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="divisible by `num_heads`"):
        small_vit(hidden_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="position_embedding"):
        small_vit(position_embedding="rope")
    model = small_vit()
    with pytest.raises(ValueError, match="built for 16x16"):
        model(images(size=20))
    with pytest.raises(ValueError, match="NHWC"):
        model(np.zeros((2, 3, 16, 16), "float32"))
    with pytest.raises(ValueError, match="Unknown backbone"):
        backbones.get_backbone("vit_huge")
    with pytest.raises(ValueError, match="no patch size"):
        backbones.get_backbone("resnet50", image_size=64, patch_size=16)


@pytest.mark.slow_on("jax", "tensorflow")  # the same check runs on PyTorch in the default run
def test_resnet50_v1_shapes_and_round_trip(tmp_path):
    model = backbones.get_backbone("resnet50_v1", image_size=64)
    assert model.variant == "v1" and not model.zero_init_last_bn
    x = images(2, 64)
    features = model(x)
    assert tuple(features.shape) == (2, 2, 2, 2048)
    assert tuple(model.pooled_features(features).shape) == (2, 2048)
    assert model.count_params() == 23_587_712  # ResNet-50 without its classifier
    path = os.path.join(tmp_path, "resnet.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(features), atol=1e-5)
    with pytest.raises(ValueError, match="output stride 32"):
        backbones.ResNetBackbone(image_size=48)


def test_input_normalisation():
    model = small_vit(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    np.testing.assert_allclose(to_numpy(model.normalize(np.full((1, 2, 2, 3), 0.75, "float32"))), 1.0)


@pytest.mark.slow_on("jax", "tensorflow")  # the same check runs on PyTorch in the default run
def test_resnet50_v1_5_shapes_and_round_trip(tmp_path):
    """torchvision's ResNet-50 layout (stride in the 3x3 convolution, no conv biases)."""
    model = backbones.get_backbone("resnet50_v1_5", image_size=64)
    assert model.variant == "v1.5" and model.get_config()["variant"] == "v1.5"
    x = images(2, 64)
    features = model(x)
    assert tuple(features.shape) == (2, 2, 2, 2048)
    assert tuple(model.pooled_features(features).shape) == (2, 2048)
    # torchvision's resnet50 without fc: 23,508,032 parameters, + 53,120 BatchNorm statistics
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 23_508_032
    assert model.count_params() == 23_561_152
    strided = model.resnet.get_layer("conv3_block1_2_conv")
    assert strided.strides == (2, 2) and not strided.use_bias
    assert model.resnet.get_layer("conv3_block1_1_conv").strides == (1, 1)
    assert model.resnet.get_layer("conv3_block1_2_bn").epsilon == 1e-5
    path = os.path.join(tmp_path, "resnet_v1_5.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, backbones.ResNetBackbone) and loaded.variant == "v1.5"
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(features), atol=1e-5)
    assert backbones.ResNetBackbone(image_size=32).variant == "v1.5"  # the default: MFM's network
    with pytest.raises(ValueError, match="Unknown ResNet variant"):
        backbones.ResNetBackbone(image_size=32, variant="v2")


@pytest.mark.slow_on("jax", "tensorflow")  # the same check runs on PyTorch in the default run
@pytest.mark.parametrize("variant", ["v1", "v1.5"])
def test_resnet_layouts_share_weights_and_outputs(variant):
    """The channels-first network and the channels-last one (the default) take the same weights
    and give the same channels-last features."""
    default = backbones.ResNetBackbone(image_size=32, variant=variant)
    assert default.get_config()["data_format"] is None
    assert not default.channels_first
    last = backbones.ResNetBackbone(image_size=32, variant=variant, data_format="channels_last")
    first = backbones.ResNetBackbone(image_size=32, variant=variant, data_format="channels_first")
    assert keras.config.image_data_format() == "channels_last"  # the global setting is restored
    rng = np.random.default_rng(0)
    # random weights, positive variances: every BatchNorm statistic and scale differs per channel
    weights = [(np.abs(w) + 0.5 if "variance" in v.path
                else rng.normal(0, 0.05, w.shape) + (w if "gamma" in v.path else 0))
               .astype("float32") for v, w in zip(last.weights, last.get_weights())]
    last.set_weights(weights)
    first.set_weights(weights)
    if BACKEND == "tensorflow":
        pytest.skip("TensorFlow's CPU convolutions are channels-last only")
    x = images(2, 32)
    reference = to_numpy(last(x, training=False))
    assert reference.shape == (2, 1, 1, 2048)
    np.testing.assert_allclose(to_numpy(first(x, training=False)), reference, atol=1e-4, rtol=1e-4)
    # training mode: batch statistics over (B, H, W) of each channel, in either layout
    x = images(8, 32)
    trained_last, trained_first = to_numpy(last(x, training=True)), to_numpy(first(x, training=True))
    np.testing.assert_allclose(trained_first, trained_last, atol=1e-3 * np.abs(trained_last).max())
    with pytest.raises(ValueError, match="Unknown data_format"):
        backbones.ResNetBackbone(image_size=32, data_format="NCHW")


def test_resnet50_v1_is_keras_application_on_fused_layers():
    """`variant="v1"` is `keras.applications.ResNet50` with keras_mfm's Conv2D/BatchNormalization
    swapped in: same layer names, weights and (inference and training) outputs; on PyTorch this
    holds the fused kernels to Keras' own layers over the whole network."""
    from keras_mfm.layers import fused

    ours = backbones.ResNetBackbone(image_size=64, variant="v1")
    app = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    assert [layer.name for layer in ours.resnet.layers[1:]] == [layer.name for layer in app.layers[1:]]
    kinds = {type(layer) for layer in ours.resnet.layers}
    assert fused.Conv2D in kinds and fused.BatchNormalization in kinds
    assert keras.layers.Conv2D not in kinds and keras.layers.BatchNormalization not in kinds
    rng = np.random.default_rng(1)
    weights = [(np.abs(w) + 0.5 if "variance" in v.path
                else rng.normal(0, 0.05, w.shape) + (w if "gamma" in v.path else 0))
               .astype("float32") for v, w in zip(app.weights, app.get_weights())]
    app.set_weights(weights)
    ours.resnet.set_weights(weights)
    x = images(4, 64)
    normalized = to_numpy(ours.normalize(x))
    # tolerances: float32 rounding through 53 layers; in training mode batch statistics over few
    # values (B x 2 x 2 at conv5) amplify it: both are ~1e-3 (of features up to ~7.5) from a
    # float64 run of Keras' network on this input
    for training, tolerance in ((False, 1e-5), (True, 5e-4)):
        want = to_numpy(app(normalized, training=training))
        got = to_numpy(ours(x, training=training))
        np.testing.assert_allclose(got, want, atol=tolerance * np.abs(want).max(), rtol=0)
    # the training call moved the moving statistics of both alike
    for a, b in zip(app.non_trainable_weights, ours.resnet.non_trainable_weights):
        np.testing.assert_allclose(to_numpy(b), to_numpy(a), rtol=1e-4, atol=1e-5)


def test_call_sublayer_skips_keras_call_only_without_autocast(monkeypatch):
    """`call_sublayer` runs a built float32 sublayer's `call` directly (same numbers as a Keras
    call); unbuilt or mixed-precision sublayers go through `Layer.__call__` (autocasting)."""
    from keras_mfm.layers.fused import Dense
    from keras_mfm.layers.transformer import TransformerBlock, call_sublayer

    calls = []
    original = keras.layers.Layer.__call__

    def spy(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras.layers.Layer, "__call__", spy)
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    block = TransformerBlock(8, 2, name="block")
    block.build((None, 3, 8))
    direct = to_numpy(call_sublayer(block, block.fc1, x))
    assert calls == []
    np.testing.assert_allclose(direct, to_numpy(block.fc1(x)), atol=1e-6)
    assert calls == ["fc1"]
    calls.clear()
    unbuilt = Dense(4, name="unbuilt")
    call_sublayer(block, unbuilt, x)
    assert calls == ["unbuilt"]
    calls.clear()
    mixed = TransformerBlock(8, 2, dtype="mixed_bfloat16", name="mixed")
    mixed.build((None, 3, 8))
    out = call_sublayer(mixed, mixed.fc1, x)
    assert calls == ["fc1"] and keras.backend.standardize_dtype(out.dtype) == "bfloat16"


def test_resnet50_default_is_timm_v1_5_with_zero_init_last_bn():
    """MFM's ResNet-50 is timm's: v1.5, and the last BatchNorm of each of the 16 bottlenecks starts
    at gamma = 0 (`zero_init_last_bn`), so every residual block starts as its shortcut."""
    model = backbones.get_backbone("resnet50", image_size=32)
    assert model.variant == "v1.5" and model.zero_init_last_bn
    last_bns = [layer for layer in model.resnet.layers if layer.name.endswith("_3_bn")]
    assert len(last_bns) == 16
    for layer in model.resnet.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma = to_numpy(layer.gamma)
            np.testing.assert_array_equal(gamma, 0.0 if layer in last_bns else 1.0)
    # He-normal fan-out convolution kernels (timm): std sqrt(2 / (k * k * out))
    kernel = to_numpy(model.resnet.get_layer("conv4_block2_2_conv").kernel)
    assert np.std(kernel) == pytest.approx(math.sqrt(2 / (3 * 3 * 256)), rel=0.02)
    plain = backbones.ResNetBackbone(image_size=32, zero_init_last_bn=False)
    assert np.all(to_numpy(plain.resnet.get_layer("conv2_block1_3_bn").gamma) == 1.0)
    assert backbones.ResNetBackbone.from_config(model.get_config()).zero_init_last_bn
