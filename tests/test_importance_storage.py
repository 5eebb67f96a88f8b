"""The AMT/FAMT importance table stored compactly (float16, or 8-bit logarithmic codes with a step
per image) or as float32: encoding against hand cases, decoding in the model, the draw keys' error
bound, saving, and the size checks."""

import os

import keras
import numpy as np
import pytest

from keras_mfm import importance as imp
from keras_mfm import masking
from keras_mfm.models.mae import MAE
from tests.conftest import to_numpy
from tests.test_mae import tiny_encoder


def model_with(storage, num_images=6):
    model = MAE(tiny_encoder(), mask_ratio=0.45, throw_ratio=0.40, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                seed=0, importance="famt", num_images=num_images, importance_storage=storage)
    model.build()
    return model


def lognormal_maps(rows, n=16, sigma=1.5, seed=0):
    """Positive maps whose logs are normal (sigma 1.5: weights spanning a factor ~10^3 per row)."""
    return np.exp(np.random.default_rng(seed).normal(0.0, sigma, size=(rows, n))).astype("float32")


def test_uint8_codes_of_a_hand_case():
    # relative weights 1, 1/2, 1/4 and a zero: log spread log 4 over 254 steps, so 1/2 is 127 steps down
    codes, steps = imp.encode_table(np.array([[4.0, 2.0, 1.0, 0.0], [3.0, 3.0, 3.0, 3.0], [0.0] * 4]), "uint8")
    assert codes.dtype == np.uint8 and steps.dtype == np.float32
    np.testing.assert_array_equal(codes, [[255, 128, 1, 0], [255] * 4, [255] * 4])
    np.testing.assert_allclose(steps, [np.log(4.0) / 254, 0.0, 0.0], rtol=1e-6)
    decoded = to_numpy(imp.decode_rows(codes, steps))
    np.testing.assert_allclose(decoded, [[1.0, 0.5, 0.25, 0.0], [1.0] * 4, [1.0] * 4], rtol=1e-5)


def test_float16_keeps_positive_weights_positive():
    values, steps = imp.encode_table(np.array([[8.0, 2.0, 8e-9, 0.0]]), "float16")
    assert values.dtype == np.float16 and steps is None
    np.testing.assert_array_equal(values.astype("float32"), [[1.0, 0.25, np.float16(2.0**-14), 0.0]])
    same, _ = imp.encode_table(np.array([[8.0, 2.0]], "float32"), "float32")
    np.testing.assert_array_equal(same, [[8.0, 2.0]])


@pytest.mark.parametrize("storage", ["uint8", "float16"])
def test_stored_maps_decode_within_the_bound_and_keep_the_draw_keys(storage):
    table = lognormal_maps(6)
    table[2, 3] = 0.0  # a zero weight stays zero
    model = model_with(storage)
    model.set_importance(table)
    assert str(model.importance_table.dtype) == storage
    decoded = to_numpy(model.importance_maps())
    relative = table / table.max(axis=1, keepdims=True)
    assert decoded[2, 3] == 0.0 and np.all(decoded[relative > 0] > 0)
    positive = relative > 0
    key_error = np.abs(np.log(decoded[positive]) - np.log(relative[positive]))
    # uint8: half a step (log spread / 254 / 2) per row; float16: its relative rounding 2**-11
    steps = np.log(relative.max(axis=1) / np.where(positive, relative, np.inf).min(axis=1)) / 254
    bound = np.broadcast_to((steps / 2)[:, None], table.shape)[positive] if storage == "uint8" else 2.0**-11
    assert np.all(key_error <= bound * 1.001 + 1e-6), key_error.max()
    # a row looked up by index is the same row
    np.testing.assert_array_equal(to_numpy(model.importance_maps(np.array([4, 1]))), decoded[[4, 1]])


def test_selection_of_a_compact_table_matches_its_float32_draw_mostly():
    """Same Gumbel noise (one seed), float32 against uint8 weights: the masked set of a row changes
    only where two keys are closer than the quantisation error."""
    table = lognormal_maps(200, n=64, seed=3)
    codes, steps = imp.encode_table(table, "uint8")
    decoded = to_numpy(imp.decode_rows(codes, steps))
    a = to_numpy(masking.select_tokens(table, 0.45, 0.40, seed=11).masked)
    b = to_numpy(masking.select_tokens(decoded, 0.45, 0.40, seed=11).masked)
    identical = lambda p, q: np.mean([np.array_equal(x, y) for x, y in zip(p, q)])  # noqa: E731
    overlap = np.mean([len(np.intersect1d(x, y)) / len(x) for x, y in zip(a, b)])
    assert identical(a, b) > 0.8 and overlap > 0.99, (identical(a, b), overlap)  # measured: 0.925, 0.997
    other_seed = to_numpy(masking.select_tokens(table, 0.45, 0.40, seed=12).masked)
    assert identical(a, other_seed) < 0.05  # another draw of the same weights: hardly ever the same set


def test_uint8_table_is_four_times_smaller_and_saves_exactly(tmp_path):
    model = model_with("uint8")
    model.set_importance(lognormal_maps(6))
    stored = to_numpy(model.importance_table)
    assert stored.dtype == np.uint8 and stored.nbytes == 6 * 16
    assert imp.table_bytes(6, 16, "uint8") == 6 * 16 + 6 * 4 and imp.table_bytes(6, 16, "float32") == 6 * 16 * 4
    assert imp.table_bytes(1_281_167, 196, "float32") / imp.table_bytes(1_281_167, 196, "uint8") > 3.8
    path = os.path.join(tmp_path, "famt.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.importance_storage == "uint8"
    np.testing.assert_array_equal(to_numpy(loaded.importance_table), stored)
    np.testing.assert_array_equal(to_numpy(loaded.importance_step), to_numpy(model.importance_step))


def test_a_config_written_before_the_option_is_a_float32_table():
    config = model_with("uint8").get_config()
    assert config["importance_storage"] == "uint8"
    del config["importance_storage"]
    assert MAE.from_config(config).importance_storage == "float32"
    assert MAE(tiny_encoder(), importance="famt", num_images=2).importance_storage == imp.DEFAULT_IMPORTANCE_STORAGE
    with pytest.raises(ValueError, match="Unknown importance_storage 'int4'"):
        model_with("int4")


@pytest.mark.parametrize("storage", ["uint8", "float32"])
def test_a_table_of_another_size_is_one_clear_error(storage):
    model = model_with(storage, num_images=6)
    for shape, got in (((7, 16), "7 images x 16 patches"), ((6, 64), "6 images x 64 patches")):
        with pytest.raises(ValueError) as error:
            model.set_importance(np.ones(shape, "float32"))
        message = str(error.value)
        assert got in message and "for 6 images x 16 patches" in message and "\n" not in message, message
    with pytest.raises(ValueError, match="table is for 6 training images, but the data set has 9") as error:
        model.check_num_images(9)
    assert "\n" not in str(error.value)
    model.check_num_images(6)


@pytest.mark.slow_on("jax", "tensorflow")  # end to end: XLA / graph tracing make it several times the PyTorch time
def test_resuming_on_a_data_set_of_another_size_is_one_clear_error(tmp_path, capsys):
    import train
    from tests.test_data import write_folder

    root = write_folder(str(tmp_path / "set"), per_class=4)  # 8 training images
    output = str(tmp_path / "famt")
    argv = ["--method", "famt", "--data", root, "--output", output, "--epochs", "2", "--steps-per-epoch", "1",
            "--batch-size", "4", "--image-size", "16", "--patch-size", "4", "--depth", "1", "--decoder-dim", "16",
            "--decoder-depth", "1", "--decoder-heads", "2", "--refresh-warmup", "1", "--eval", "none", "--quiet"]
    assert train.main(argv) == 0
    model = keras.saving.load_model(os.path.join(output, "checkpoint.keras"))
    assert model.importance_storage == "uint8" and model.importance_location == imp.TRAINING_IMPORTANCE_LOCATION
    stored = model.host_table.values if model.host_table is not None else to_numpy(model.importance_table)
    assert stored.dtype == np.uint8 and stored.shape == (8, 16) and float(to_numpy(model.refresh_count)) == 1
    capsys.readouterr()
    write_folder(str(tmp_path / "set"), classes=("bird",), per_class=4, splits=("train",))  # now 12
    assert train.main(["--resume", "--output", output, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "8" in err and "12" in err and "train" in err, err


def test_a_large_table_is_encoded_in_slices_as_in_one_piece(monkeypatch):
    table = lognormal_maps(10, seed=5)
    whole = imp.encode_table(table, "uint8")
    monkeypatch.setattr(imp, "_CHUNK_ROWS", 3)
    sliced = imp.encode_table(table, "uint8")
    np.testing.assert_array_equal(sliced[0], whole[0])
    np.testing.assert_array_equal(sliced[1], whole[1])
    half = imp.encode_table(table, "float16")[0]
    monkeypatch.setattr(imp, "_CHUNK_ROWS", 65536)
    np.testing.assert_array_equal(half, imp.encode_table(table, "float16")[0])


class FixedScorer:
    """Stands in for a scorer: the maps of `table` for the batch's rows (the images are ignored)."""

    def __init__(self, table):
        self.table, self.rows = table, []

    def __call__(self, images):
        rows, self.rows = self.rows[: len(images)], self.rows[len(images):]
        return self.table[rows]


@pytest.mark.parametrize("storage", ["uint8", "float16"])
def test_scoring_into_the_stored_form_batch_by_batch_is_the_same_as_encoding_the_float32_table(storage):
    # 9 images in batches of 4 (the last one short), image 7 never scored (stays uniform)
    table = lognormal_maps(9)
    table[1] = 0.0  # an all-zero row
    order = [0, 3, 5, 1, 2, 4, 6, 8]
    scorer = FixedScorer(table)
    scorer.rows = list(order)
    batches = [(np.zeros((len(order[i:i + 4]), 8, 8, 3), "float32"), np.array(order[i:i + 4]))
               for i in range(0, len(order), 4)]
    stored = imp.score_images(tiny_encoder(), batches, 9, shared=scorer, scorer=object(), storage=storage)
    assert isinstance(stored, imp.StoredTable) and stored.values.dtype == np.dtype(storage)
    expected = table.copy()
    expected[7] = 1.0
    want_values, want_steps = imp.encode_table(expected, storage)
    np.testing.assert_array_equal(stored.values, want_values)
    if storage == "uint8":
        np.testing.assert_array_equal(stored.steps, want_steps)
    else:
        assert stored.steps is None
    # stored as it is: the same variables as setting the float32 table
    direct, from_stored = model_with(storage, 9), model_with(storage, 9)
    direct.set_importance(expected)
    from_stored.set_importance(stored)
    np.testing.assert_array_equal(to_numpy(from_stored.importance_table), to_numpy(direct.importance_table))
    np.testing.assert_array_equal(to_numpy(from_stored.importance_maps()), to_numpy(direct.importance_maps()))
    assert from_stored.importance_ready and float(to_numpy(from_stored.refresh_count)) == 1.0
    # a stored table of another storage, or size, is one clear error
    with pytest.raises(ValueError, match="score it with storage='float32'"):
        model_with("float32", 9).set_importance(stored)
    with pytest.raises(ValueError, match="for 6 images x 16 patches"):
        model_with(storage, 6).set_importance(stored)


def test_a_refresh_scores_into_the_models_storage(monkeypatch):
    # the refresh asks score_images for the model's storage, and stores what comes back unchanged
    model = model_with("uint8", 6)
    asked = {}
    real = imp.score_images

    def spy(*args, **kwargs):
        asked["storage"] = kwargs.get("storage")
        result = real(*args, **kwargs)
        asked["type"] = type(result)
        return result

    monkeypatch.setattr(imp, "score_images", spy)
    images = np.random.default_rng(0).random((6, 16, 16, 3)).astype("float32")
    refresh = imp.ImportanceRefresh(lambda: [(images, np.arange(6))], warmup_epochs=1, interval=1)
    refresh.set_model(model)
    refresh.on_epoch_begin(1)
    assert asked == {"storage": "uint8", "type": imp.StoredTable}
    assert model.importance_ready and str(model.importance_table.dtype) == "uint8"
