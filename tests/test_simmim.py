"""SimMIM and SimMIM + FAMT (keras_mfm.models.simmim) against hand-computed cases and NumPy."""

import math
import os

import keras
import numpy as np
import pytest

from keras_mfm import backbones, methods
from keras_mfm.models.mae import patchify
from keras_mfm.models.simmim import SimMIM, SimMIMMasking
from tests.conftest import smooth_images, to_numpy, value_and_grad


def tiny_encoder(size=16, patch=4):
    return backbones.ViTBackbone(image_size=size, patch_size=patch, hidden_dim=32, depth=2, num_heads=2)


def tiny_simmim(size=16, **options):
    model = SimMIM(tiny_encoder(size), seed=0, **options)
    model.build()
    return model


def patch_slice(index, patch=4, columns=4):
    row, col = divmod(int(index), columns)
    return slice(row * patch, (row + 1) * patch), slice(col * patch, (col + 1) * patch)


def test_random_mask_covers_whole_units():
    model = tiny_simmim(size=32)  # patch 4, mask unit 8: a 4x4 grid of units, each 2x2 patches
    assert model.mask_patch_size == 8 and model.unit_grid == (4, 4)
    patch_mask, masked = model.random_unit_mask(64)
    patch_mask, masked = to_numpy(patch_mask), to_numpy(masked)
    units = math.ceil(16 * 0.6)  # SimMIM rounds up: 10 of 16 units
    assert masked.shape == (64, units * 4)
    grid = patch_mask.reshape(64, 4, 2, 4, 2)
    # every unit is all-masked or all-visible, and exactly `units` units are masked per image
    assert np.all(grid.min(axis=(2, 4)) == grid.max(axis=(2, 4)))
    np.testing.assert_array_equal(grid[:, :, 0, :, 0].reshape(64, 16).sum(1), units)
    for b in range(64):  # the indices are the masked patches, ascending
        np.testing.assert_array_equal(masked[b], np.flatnonzero(patch_mask[b]))
    assert len({tuple(m) for m in masked}) > 50  # random across images
    # every unit is masked about 10/16 of the time
    np.testing.assert_allclose(grid[:, :, 0, :, 0].mean(0), units / 16, atol=0.25)


def test_masked_patches_reach_the_encoder_only_as_mask_tokens():
    model = tiny_simmim()
    images = smooth_images(2, 16)
    masking = model.draw(images)
    scrambled = images.copy()
    for b in range(2):
        for index in to_numpy(masking.masked)[b]:
            rows, cols = patch_slice(index)
            scrambled[b, rows, cols] = np.random.default_rng(int(index)).random((4, 4, 3))
    np.testing.assert_allclose(to_numpy(model.predict_masked(images, masking)),
                               to_numpy(model.predict_masked(scrambled, masking)), atol=1e-5)
    # ... and without the mask token the same pixels do change the prediction
    unmasked = masking._replace(patch_mask=np.zeros_like(to_numpy(masking.patch_mask)))
    assert not np.allclose(to_numpy(model.predict_masked(images, unmasked)),
                           to_numpy(model.predict_masked(scrambled, unmasked)), atol=1e-3)


def test_loss_is_l1_on_masked_pixels_only():
    model = tiny_simmim()
    images = smooth_images(2, 16)
    masking = model.draw(images)
    prediction = to_numpy(model.predict_masked(images, masking))
    target = ((images - np.array(model.encoder.mean)) / np.array(model.encoder.std)).astype("float32")
    target = to_numpy(patchify(target, 4))
    masked = to_numpy(masking.masked)
    # SimMIM: sum(|x_rec - x| * mask) / (sum(mask) * C), mask per pixel
    pixel_mask = np.zeros((2, 16, 16, 1))
    reconstruction = np.zeros((2, 16, 16, 3))
    for b in range(2):
        for k, index in enumerate(masked[b]):
            rows, cols = patch_slice(index)
            pixel_mask[b, rows, cols] = 1
            reconstruction[b, rows, cols] = prediction[b, k].reshape(4, 4, 3)
    target_image = ((images - np.array(model.encoder.mean)) / np.array(model.encoder.std))
    expected = np.sum(np.abs(reconstruction - target_image) * pixel_mask) / (pixel_mask.sum() * 3)
    got = float(to_numpy(model.reconstruction_loss(images, prediction, masking.masked)))
    assert got == pytest.approx(expected, rel=1e-5)
    # the visible pixels do not count: changing the image there leaves the loss unchanged
    changed = images.copy()
    visible = np.flatnonzero(1 - to_numpy(masking.patch_mask)[0])
    rows, cols = patch_slice(visible[0])
    changed[0, rows, cols] = 1.0 - changed[0, rows, cols]
    assert float(to_numpy(model.reconstruction_loss(changed, prediction, masking.masked))) == pytest.approx(got)
    assert target.shape == (2, 16, 48)


def famt_simmim(num_images=4):
    model = methods.build_method("simmim_famt", tiny_encoder(), seed=0, num_images=num_images)
    model.build()
    return model


def test_famt_variant_counts_and_warmup():
    model = famt_simmim()
    images = smooth_images(3, 16)
    # before the first refresh: random patch masking at SimMIM's 0.6, nothing thrown; MAE's rule
    # keeps int(16 * 0.4) = 6 and masks 10 (= SimMIM's own ceil(0.6 * 16))
    masking = model.draw(images)
    assert to_numpy(masking.masked).shape == (3, 10) and to_numpy(masking.token_indices).shape == (3, 16)
    model.set_importance(np.random.default_rng(0).random((4, 16)).astype("float32") + 0.1)
    masking = model.draw(images, importance=np.ones((3, 16), "float32"))
    # 0.45 / 0.40 of 16: 7 masked, 6 thrown, 3 visible; the encoder sees 3 + 7
    assert to_numpy(masking.masked).shape == (3, 7) and to_numpy(masking.token_indices).shape == (3, 10)
    prediction, masked = model({"images": images, "importance": np.ones((3, 16), "float32")})
    assert tuple(prediction.shape) == (3, 7, 48) and tuple(masked.shape) == (3, 7)


def test_famt_thrown_patches_change_neither_loss_nor_gradients():
    model = famt_simmim()
    model.set_importance(np.ones((4, 16), "float32"))
    images = smooth_images(1, 16)
    masking = model.draw(images, importance=np.ones((1, 16), "float32"))
    sequence = set(to_numpy(masking.token_indices)[0].tolist())
    thrown = [i for i in range(16) if i not in sequence]
    assert len(thrown) == 6
    perturbed = images.copy()
    for index in thrown:
        rows, cols = patch_slice(index)
        perturbed[0, rows, cols] = np.random.default_rng(int(index)).random((4, 4, 3))

    def loss_of(x):
        return model.reconstruction_loss(x, model.predict_masked(x, masking), masking.masked)

    value, grad = value_and_grad(loss_of, images)
    value_p, _ = value_and_grad(loss_of, perturbed)
    assert float(value) == pytest.approx(float(value_p), rel=1e-6)
    for index in thrown:
        rows, cols = patch_slice(index)
        assert np.all(grad[0, rows, cols] == 0)
    # the masked patches' pixels only enter the loss as targets, never through the encoder
    assert isinstance(masking, SimMIMMasking)


@pytest.mark.parametrize("name", ["simmim", "simmim_famt"])
def test_fit_reduces_loss_and_round_trips(tmp_path, name):
    keras.utils.set_random_seed(0)
    options = {"num_images": 64} if name == "simmim_famt" else {}
    model = methods.build_method(name, tiny_encoder(), seed=0, **options)
    model.build()
    if name == "simmim_famt":
        model.set_importance(np.random.default_rng(0).random((64, 16)).astype("float32") + 0.01)
    model.compile(optimizer=keras.optimizers.AdamW(2e-3))
    images = smooth_images(64, 16)
    inputs = images if name == "simmim" else {"images": images, "importance": np.ones((64, 16), "float32")}
    history = model.fit(inputs, epochs=6, batch_size=16, verbose=0).history["loss"]
    assert history[-1] < history[0] * 0.9, history
    path = os.path.join(tmp_path, f"{name}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, SimMIM) and loaded.get_config()["mask_patch_size"] == model.mask_patch_size
    np.testing.assert_array_equal(to_numpy(loaded.mask_token), to_numpy(model.mask_token))
    for a, b in zip(model.encoder.weights, loaded.encoder.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_bad_configurations():
    with pytest.raises(ValueError, match="ViT"):
        SimMIM(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        SimMIM(tiny_encoder(), mask_patch_size=6)
    with pytest.raises(ValueError, match="divides the image size"):
        SimMIM(tiny_encoder(), mask_patch_size=12)
    with pytest.raises(ValueError, match="importance"):
        SimMIM(tiny_encoder(), throw_ratio=0.3)
    with pytest.raises(ValueError, match="patch size"):
        SimMIM(tiny_encoder(), mask_patch_size=8, importance="famt", num_images=4)
    with pytest.raises(ValueError, match="mask_ratio"):
        SimMIM(tiny_encoder(), mask_ratio=1.0)
    with pytest.raises(ValueError, match="mask_token"):
        tiny_encoder()(smooth_images(1, 16), patch_mask=np.ones((1, 16), "float32"))
