
import keras
import numpy as np
import pytest

from keras_mfm import backbones, frequency, methods
from keras_mfm.models import MFM, PixelShuffleHead
from tests.conftest import smooth_images, to_numpy
from tests.harness import check_model_saving


def small_vit(size=16):
    return backbones.ViTBackbone(image_size=size, patch_size=4, hidden_dim=32, depth=2, num_heads=4)


def batch(n=8, size=16, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 3)).astype("float32")


def test_pixel_shuffle_head_layout():
    head = PixelShuffleHead(stride=2, channels=3)
    features = np.random.default_rng(0).normal(size=(1, 3, 3, 5)).astype("float32")
    out = to_numpy(head(features))
    assert out.shape == (1, 6, 6, 3)
    kernel, bias = [to_numpy(w) for w in head.conv.weights]
    conv = features @ kernel[0, 0] + bias  # (1, 3, 3, 12)
    # output pixel (2y + i, 2x + j), colour c <- conv channel (i * 2 + j) * 3 + c
    for (y, x, i, j, c) in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 2), (2, 1, 1, 1, 1)]:
        assert out[0, 2 * y + i, 2 * x + j, c] == pytest.approx(conv[0, y, x, (i * 2 + j) * 3 + c], abs=1e-5)


def test_mfm_outputs_and_loss_is_the_frequency_loss():
    model = MFM(small_vit(), radius=2.0, p_low=0.5, seed=0)
    x = batch()
    pred, mask = model(x)
    assert tuple(pred.shape) == (8, 16, 16, 3) and tuple(mask.shape) == (8, 16, 16)
    loss = model.compute_loss(x=x, y_pred=(pred, mask))
    want = frequency.frequency_loss(pred, model.encoder.normalize(x), mask)
    np.testing.assert_allclose(to_numpy(loss), to_numpy(want), rtol=1e-6)
    model_full = MFM(model.encoder, radius=2.0, seed=0, masked_loss=False)
    full = model_full.compute_loss(x=x, y_pred=(pred, mask))
    np.testing.assert_allclose(
        to_numpy(full), to_numpy(frequency.frequency_loss(pred, model.encoder.normalize(x))), rtol=1e-6
    )


def test_pixel_and_focal_loss_options():
    model = MFM(small_vit(), radius=2.0, seed=0, loss="pixel")
    x = batch()
    pred, mask = model(x)
    target = to_numpy(model.encoder.normalize(x))
    got = to_numpy(model.compute_loss(x=x, y_pred=(pred, mask)))
    np.testing.assert_allclose(got, np.mean((to_numpy(pred) - target) ** 2), rtol=1e-5)
    focal = MFM(model.encoder, radius=2.0, seed=0, focal=True, focal_alpha=2.0, focal_log=True, focal_batch=True)
    want = frequency.frequency_loss(pred, target, mask, focal=True, focal_alpha=2.0, focal_log=True, focal_batch=True)
    np.testing.assert_allclose(to_numpy(focal.compute_loss(x=x, y_pred=(pred, mask))), to_numpy(want), rtol=1e-6)
    config = focal.get_config()
    assert (config["focal"], config["focal_alpha"], config["focal_log"], config["loss"]) == (
        True,
        2.0,
        True,
        "frequency",
    )
    with pytest.raises(ValueError, match="Unknown loss 'l3'"):
        MFM(small_vit(), loss="l3")


def test_encoder_sees_the_corrupted_image():
    """The prediction depends on the input only through the frequency-filtered image."""
    model = MFM(small_vit(), radius=2.0, p_low=1.0, seed=0)  # always low-pass
    x = batch(2)
    pred, mask = model(x)
    filtered = to_numpy(frequency.frequency_filter(x, frequency.circular_mask(16, 2.0)))
    direct = model.head(model.encoder.feature_map(model.encoder(filtered)))
    np.testing.assert_allclose(to_numpy(pred), to_numpy(direct), atol=1e-5)


def _train(model, x, steps, lr):
    model.compile(optimizer=keras.optimizers.AdamW(lr, weight_decay=0.0))
    history = model.fit(x, batch_size=len(x), epochs=steps, verbose=0, shuffle=False)
    return history.history["loss"]


def test_vit_mfm_training_reduces_loss():
    keras.utils.set_random_seed(0)
    model = methods.build_method("mfm", small_vit(), p_low=1.0, seed=0)  # a fixed task on a fixed batch
    losses = _train(model, smooth_images(8, 16), steps=25, lr=3e-3)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow_on("jax", "tensorflow")  # the same check runs on PyTorch in the default run
def test_resnet50_mfm_training_reduces_loss():
    keras.utils.set_random_seed(0)
    encoder = backbones.get_backbone("resnet50", image_size=32)
    model = methods.build_method("mfm", encoder, p_low=0.0, seed=0)
    assert model.head.stride == 32
    losses = _train(model, smooth_images(8, 32), steps=8, lr=1e-4)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_default_p_low_per_backbone():
    assert methods.build_method("mfm", small_vit()).corruption.p_low == 0.5
    resnet = backbones.get_backbone("resnet50", image_size=32)
    assert methods.build_method("mfm", resnet).corruption.p_low == 0.3


def test_mfm_save_load_round_trip(tmp_path):
    model = MFM(small_vit(), radius=2.5, p_low=0.4, seed=3, gamma=2.0)
    x = batch(2)
    model(x)

    def encoder_and_head(m, images):  # deterministic (the corruption draws at random)
        tokens = m.encoder(images)
        return tokens, m.head(m.encoder.feature_map(tokens))

    loaded = check_model_saving(model, x, tmp_path, outputs=encoder_and_head, atol=1e-5)
    assert loaded.gamma == 2.0 and loaded.corruption.radius == 2.5


def test_unknown_method():
    with pytest.raises(ValueError, match="Unknown method 'mfmx'"):
        methods.build_method("mfmx", small_vit())
    assert "mfm" in methods.available_methods()


@pytest.mark.parametrize("policy", ["mixed_bfloat16"])
def test_mixed_precision_step_keeps_ffts_in_float32(policy):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = MFM(small_vit(), radius=2.0, seed=0)
        x = smooth_images(4, 16)
        pred, mask = model(x)
        assert keras.backend.standardize_dtype(pred.dtype) == "bfloat16"
        assert keras.backend.standardize_dtype(mask.dtype) == "float32"
        loss = model.compute_loss(x=x, y_pred=(pred, mask))
        assert keras.backend.standardize_dtype(loss.dtype) == "float32"
        assert all(keras.backend.standardize_dtype(v.dtype) == "float32" for v in model.trainable_variables)
        losses = _train(model, x, steps=2, lr=1e-3)
        assert np.all(np.isfinite(losses))
    finally:
        keras.config.set_dtype_policy(previous)
