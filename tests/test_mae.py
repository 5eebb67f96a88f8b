
import keras
import numpy as np
import pytest

from keras_mfm import backbones, masking, methods
from keras_mfm.models.mae import MAE, patchify, unpatchify
from keras_mfm.models.token_masking import masking_of_selection
from tests.conftest import smooth_images, to_numpy, value_and_grad
from tests.harness import check_model_saving


def tiny_encoder(size=16, patch=4):
    return backbones.ViTBackbone(image_size=size, patch_size=patch, hidden_dim=32, depth=2, num_heads=2,
                                 position_embedding="sincos")


def tiny_mae(**options):
    options = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "seed": 0, **options}
    model = MAE(tiny_encoder(), **options)
    model.build()
    return model


def test_patchify_matches_numpy_and_inverts():
    images = np.random.default_rng(0).random((2, 8, 12, 3)).astype("float32")
    patches = to_numpy(patchify(images, 4))
    assert patches.shape == (2, 6, 48)
    # patch (row 1, col 2) = pixels [4:8, 8:12], flattened (row, col, channel)
    np.testing.assert_array_equal(patches[1, 1 * 3 + 2], images[1, 4:8, 8:12].reshape(-1))
    np.testing.assert_array_equal(to_numpy(unpatchify(patches, 4, (2, 3))), images)


@pytest.mark.parametrize("mask_ratio,throw_ratio", [(0.75, 0.0), (0.45, 0.40)])
def test_shapes_and_counts(mask_ratio, throw_ratio):
    model = tiny_mae(mask_ratio=mask_ratio, throw_ratio=throw_ratio)
    masked_count, thrown_count, visible_count = masking.token_counts(16, mask_ratio, throw_ratio)
    images = smooth_images(3, 16)
    prediction, masked = model(images)
    assert tuple(prediction.shape) == (3, masked_count, 48) and tuple(masked.shape) == (3, masked_count)
    selection = model.select(images)
    assert tuple(selection.visible.shape) == (3, visible_count)
    assert tuple(selection.thrown.shape) == (3, thrown_count)


def test_loss_is_mse_on_masked_patches_only():
    model = tiny_mae(mask_ratio=0.5, throw_ratio=0.25)
    images = smooth_images(2, 16)
    selection = model.select(images)
    prediction = to_numpy(model.predict_masked(images, masking_of_selection(selection)))
    target = (images - np.array(model.encoder.mean)) / np.array(model.encoder.std)
    target = to_numpy(patchify(target.astype("float32"), 4))
    masked = to_numpy(selection.masked)
    expected = np.mean([(prediction[b] - target[b, masked[b]]) ** 2 for b in range(2)])
    got = float(to_numpy(model.reconstruction_loss(images, prediction, selection.masked)))
    assert got == pytest.approx(expected, rel=1e-5)


def test_norm_pix_targets_are_standardised_per_patch():
    model = tiny_mae(norm_pix_loss=True)
    images = smooth_images(2, 16)
    target = to_numpy(model.target(images))
    np.testing.assert_allclose(target.mean(-1), 0, atol=1e-4)
    # MAE's formula: `(x - mean) / (var + 1e-6) ** 0.5` with torch's unbiased `var` (n - 1)
    normalised = (images.astype("float64") - np.array(model.encoder.mean)) / np.array(model.encoder.std)
    patches = normalised.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 48)
    mean, var = patches.mean(-1, keepdims=True), patches.var(-1, ddof=1, keepdims=True)
    np.testing.assert_allclose(target, (patches - mean) / (var + 1e-6) ** 0.5, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(target.var(-1, ddof=1), 1, atol=2e-2)


@pytest.mark.slow_on("jax", "tensorflow")  # the same check runs on PyTorch in the default run
def test_thrown_patches_change_neither_loss_nor_gradients():
    model = tiny_mae(mask_ratio=0.5, throw_ratio=0.25)
    images = smooth_images(1, 16)
    selection = model.select(images)
    thrown = to_numpy(selection.thrown)[0]
    perturbed = images.copy()
    for index in thrown:  # scramble every thrown patch
        row, col = divmod(int(index), 4)
        perturbed[0, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] = np.random.default_rng(int(index)).random((4, 4, 3))

    def loss_of(x):
        return model.reconstruction_loss(x, model.predict_masked(x, masking_of_selection(selection)),
                                         selection.masked)

    value, grad = value_and_grad(loss_of, images)
    value_p, grad_p = value_and_grad(loss_of, perturbed)
    assert float(value) == pytest.approx(float(value_p), rel=1e-6)
    # the loss does not depend on the thrown pixels at all
    for index in thrown:
        row, col = divmod(int(index), 4)
        assert np.all(grad[0, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] == 0)
    kept = np.ones((16, 16), bool)
    for index in thrown:
        row, col = divmod(int(index), 4)
        kept[row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] = False
    np.testing.assert_allclose(grad[0][kept], grad_p[0][kept], atol=1e-6)


def test_importance_input_drives_the_masking():
    model = tiny_mae(mask_ratio=0.25, throw_ratio=0.25)
    images = smooth_images(2, 16)
    importance = np.full((2, 16), 1e-6, "float32")
    importance[:, :4] = 1.0  # four important patches: masked (drawn first) almost surely
    _, masked = model({"images": images, "importance": importance})
    assert sorted(to_numpy(masked)[0].tolist()) == [0, 1, 2, 3]


def test_fit_reduces_loss_and_round_trips(tmp_path):
    keras.utils.set_random_seed(0)
    model = methods.build_method("mae", tiny_encoder(), decoder_dim=32, decoder_depth=1, decoder_heads=2, seed=0)
    model.compile(optimizer=keras.optimizers.AdamW(2e-3))
    images = smooth_images(64, 16)
    history = model.fit(images, epochs=8, batch_size=16, verbose=0).history["loss"]
    assert history[-1] < history[0] * 0.9, history
    loaded = check_model_saving(model, images[:4], tmp_path, outputs=lambda m, x: m.encoder(x), atol=0)
    assert loaded.mask_ratio == 0.75 and loaded.counts == model.counts
    for a, b in zip(model.encoder.weights, loaded.encoder.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_famt_fit_with_importance_dict_inputs():
    model = tiny_mae(mask_ratio=0.45, throw_ratio=0.40)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    images = smooth_images(16, 16)
    importance = np.random.default_rng(0).random((16, 16)).astype("float32") + 0.01
    history = model.fit({"images": images, "importance": importance}, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_bad_configurations():
    with pytest.raises(ValueError, match="ViT"):
        MAE(keras.layers.Dense(2))
    with pytest.raises(ValueError):
        MAE(tiny_encoder(), mask_ratio=0.6, throw_ratio=0.4)
    with pytest.raises(ValueError):
        MAE(tiny_encoder(), mask_ratio=1.0)
