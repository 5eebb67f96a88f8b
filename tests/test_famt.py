"""AMT/FAMT: importance scoring, the table and its refresh inside model.fit, maps that follow the crop."""

import os

import keras
import numpy as np
import pytest

from keras_mfm import data, masking, methods
from keras_mfm.importance import ImportanceRefresh, ImportanceScorer, score_images
from keras_mfm.models.mae import MAE
from keras_mfm.models.token_masking import whole_image_inputs
from tests.conftest import smooth_images, to_numpy
from tests.test_mae import tiny_encoder


def famt_model(importance="famt", num_images=32, importance_storage="float32"):
    """A tiny AMT/FAMT MAE. The tests of exact map values keep the float32 table; the compact
    storages have their own tests (tests/test_importance_storage.py)."""
    encoder = tiny_encoder()
    model = MAE(encoder, mask_ratio=0.45, throw_ratio=0.40, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                seed=0, importance=importance, num_images=num_images, importance_storage=importance_storage,
                name=importance)
    model.build()
    return model


@pytest.mark.parametrize("method", ["amt", "famt"])
def test_scorer_is_the_spec_formula_on_the_last_block(method):
    encoder = tiny_encoder()
    images = smooth_images(3, 16)
    tokens, attention = encoder.encode(images, return_attention=True)
    if method == "amt":
        expected = masking.amt_importance(attention)
    else:
        expected = masking.famt_importance(attention, tokens[:, 1:])
    got = ImportanceScorer(encoder, method)(images)
    np.testing.assert_allclose(to_numpy(got), to_numpy(expected), rtol=1e-5, atol=1e-7)
    assert to_numpy(got).shape == (3, 16) and np.all(to_numpy(got) >= 0)


def test_score_images_fills_the_rows_of_the_given_indices():
    encoder = tiny_encoder()
    images = smooth_images(4, 16)
    batches = [(images[:2], np.array([5, 1])), (images[2:], np.array([7, 0]))]
    table = score_images(encoder, batches, num_images=9)
    expected = to_numpy(ImportanceScorer(encoder, "famt")(images))
    np.testing.assert_allclose(table[[5, 1, 7, 0]], expected, rtol=1e-5)
    np.testing.assert_array_equal(table[[2, 3, 4, 6, 8]], 1.0)  # never scored: uniform
    with pytest.raises(ValueError, match="outside the importance table"):
        score_images(encoder, [(images[:1], np.array([9]))], num_images=9)


def geometry_inputs(n, size=16):
    rng = np.random.default_rng(0)
    y0, x0 = rng.uniform(0, 0.4, size=(2, n))
    boxes = np.stack([y0, x0, y0 + 0.6, x0 + 0.6], axis=1).astype("float32")
    return {
        "images": smooth_images(n, size),
        "index": np.arange(n, dtype="int64"),
        "box": boxes,
        "flip": rng.random(n) < 0.5,
    }


@pytest.mark.slow_on("jax", "tensorflow")  # the same check runs on PyTorch in the default run
def test_refresh_inside_fit_switches_to_masking_and_throwing(tmp_path):
    keras.utils.set_random_seed(0)
    model = famt_model(num_images=32)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    inputs = geometry_inputs(32)
    unaugmented = [(inputs["images"][i:i + 16], inputs["index"][i:i + 16]) for i in (0, 16)]
    refresh = ImportanceRefresh(lambda: unaugmented, warmup_epochs=1, interval=1)
    assert [refresh.due(e) for e in range(4)] == [False, True, True, True]
    # epoch 0: plain MAE (warm-up ratio 0.75, nothing thrown)
    assert model.select(inputs["images"][:2]).masked.shape[1] == 12
    snapshots = []

    class Snapshot(keras.callbacks.Callback):  # scores with the encoder as it is at the refresh
        def on_epoch_begin(self, epoch, logs=None):
            if refresh.due(epoch):
                snapshots.append(score_images(self.model.encoder, unaugmented, 32))

    history = model.fit(inputs, epochs=3, batch_size=16, callbacks=[refresh, Snapshot()], verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
    assert [epoch for epoch, _ in refresh.history] == [1, 2]
    assert float(to_numpy(model.refresh_count)) == 2 and model.importance_ready
    table = to_numpy(model.importance_table)
    np.testing.assert_allclose(table, snapshots[-1], rtol=1e-4, atol=1e-7)
    assert not np.allclose(snapshots[0], snapshots[1])  # the encoder trained in between
    # now 0.45 of 16 = 7 masked, 0.40 of 16 = 6 thrown, 3 visible
    _, masked = model({k: v[:4] for k, v in inputs.items()})
    assert to_numpy(masked).shape == (4, 7)
    # the table is part of the saved model, and the phase comes back with it
    path = os.path.join(tmp_path, "famt.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert not loaded.importance_ready
    loaded.sync_importance_phase()
    assert loaded.importance_ready and loaded.importance == "famt"
    np.testing.assert_array_equal(to_numpy(loaded.importance_table), table)


def test_importance_map_follows_the_crop_and_flip():
    model = famt_model(num_images=2)
    table = np.arange(32, dtype="float32").reshape(2, 16) + 1.0
    model.set_importance(table)
    identity = to_numpy(model.augmented_importance(np.array([1, 0]), np.array([[0, 0, 1, 1]] * 2, "float32"),
                                                   np.array([False, False])))
    np.testing.assert_allclose(identity, table[[1, 0]], atol=1e-5)
    flipped = to_numpy(model.augmented_importance(np.array([0]), np.array([[0, 0, 1, 1]], "float32"),
                                                  np.array([True])))
    np.testing.assert_allclose(flipped.reshape(4, 4), table[0].reshape(4, 4)[:, ::-1], atol=1e-5)
    # the bottom-right quarter upsampled 2x, bilinear at cell centres: output cell (0, 0) has its
    # centre at source cell coordinate 1.75 on both axes -> 1/16 x 6 + 3/16 x 7 + 3/16 x 10 + 9/16 x 11
    quarter = to_numpy(model.augmented_importance(np.array([0]), np.array([[0.5, 0.5, 1, 1]], "float32"),
                                                  np.array([False]))).reshape(4, 4)
    assert quarter[0, 0] == pytest.approx(6 / 16 + 21 / 16 + 30 / 16 + 99 / 16, abs=1e-5)
    assert quarter[3, 3] == pytest.approx(16.0, abs=1e-5)  # past the last centre: clamped


def test_pipeline_boxes_and_flips_describe_the_crop(cifar_root):
    import tensorflow as tf

    split = data.load_split(cifar_root, "train", limit=8)
    batch = next(iter(data.pretraining_dataset(split, 32, 8, seed=1, with_geometry=True, shuffle=False)))
    sources = [image for image, _, _ in split.dataset]
    for image, index, box, flip in zip(*(np.asarray(batch[k]) for k in ("images", "index", "box", "flip"))):
        source = np.asarray(sources[list(np.asarray([i for _, _, i in split.dataset])).index(index)])
        y0, x0, y1, x1 = np.round(box * 32).astype(int)
        crop = tf.image.resize(source[y0:y1, x0:x1].astype("float32") / 255.0, (32, 32), antialias=True).numpy()
        if flip:
            crop = crop[:, ::-1]
        np.testing.assert_allclose(image, np.clip(crop, 0, 1), atol=1e-4)


def test_bad_configurations():
    with pytest.raises(ValueError, match="warm-up"):
        ImportanceRefresh(lambda: [], warmup_epochs=0, interval=1)
    with pytest.raises(ValueError, match="interval"):
        ImportanceRefresh(lambda: [], warmup_epochs=1, interval=0)
    with pytest.raises(ValueError, match="num_images"):
        MAE(tiny_encoder(), importance="famt")
    with pytest.raises(ValueError, match="importance"):
        MAE(tiny_encoder(), importance="random")
    with pytest.raises(ValueError, match="finite"):
        famt_model().set_importance(np.full((32, 16), np.nan, "float32"))
    with pytest.raises(ValueError, match=">= 0"):
        famt_model().set_importance(-np.ones((32, 16), "float32"))


def test_whole_image_inputs_use_the_stored_maps_unchanged():
    model = famt_model(num_images=8)
    table = np.random.default_rng(1).random((8, model.encoder.num_patches)).astype("float32") + 0.01
    model.set_importance(table)
    inputs = whole_image_inputs(smooth_images(3, 16), index=[5, 0, 7])
    assert inputs["box"].shape == (3, 4) and inputs["flip"].tolist() == [0, 0, 0]
    maps = model.augmented_importance(inputs["index"], inputs["box"], inputs["flip"])
    np.testing.assert_allclose(to_numpy(maps), table[[5, 0, 7]], atol=1e-6)
