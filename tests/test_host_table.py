"""The importance table kept on the host (`importance_location="host"`): the input pipeline adds each
batch's rows (`data.with_importance`), and training gives the same losses and weights as the table
held as a model variable; the table travels in the `.keras` file; missing rows are clear errors."""

import os

import keras
import numpy as np
import pytest

from keras_mfm import data
from keras_mfm import importance as imp
from keras_mfm.importance import ImportanceRefresh
from keras_mfm.models.mae import MAE
from tests.conftest import to_numpy
from tests.test_famt import geometry_inputs
from tests.test_importance_storage import lognormal_maps
from tests.test_mae import tiny_encoder


def famt(location, storage="uint8", num_images=16, seed=0):
    keras.utils.set_random_seed(seed)  # the same initial weights for either location
    model = MAE(tiny_encoder(), mask_ratio=0.45, throw_ratio=0.40, decoder_dim=32, decoder_depth=1, decoder_heads=2,
                seed=0, importance="famt", num_images=num_images, importance_storage=storage,
                importance_location=location)
    model.build()
    return model


def batches(inputs, batch_size=8):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(inputs).batch(batch_size)


# -- HostTable ------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["uint8", "float16", "float32"])
def test_host_table_starts_uniform_and_reads_rows_by_index(storage):
    table = imp.HostTable(5, 16, storage)
    assert table.shape == (5, 16) and str(table.values.dtype) == storage and table.version == 0
    assert (table.steps is not None) == (storage == "uint8")
    np.testing.assert_array_equal(to_numpy(imp.decode_rows(*table.rows([0, 4]))
                                           if storage == "uint8" else imp.decode_rows(table.rows([0, 4])[0])), 1.0)
    maps = lognormal_maps(5)
    table.set(*imp.encode_table(maps, storage))
    assert table.version == 1
    values, steps = table.rows(np.array([3, 1]))
    expected_values, expected_steps = imp.encode_table(maps[[3, 1]], storage)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(steps, expected_steps if storage == "uint8" else np.zeros(2, "float32"))
    with pytest.raises(ValueError, match=r"Image index 5 is outside the importance table \(5 rows\)"):
        table.rows([0, 5])
    with pytest.raises(ValueError, match="table of shape \\(5, 16\\) was expected"):
        table.set(*imp.encode_table(lognormal_maps(4), storage))


def test_host_table_files_round_trip_memory_mapped(tmp_path):
    table = imp.HostTable(6, 16, "uint8")
    table.set(*imp.encode_table(lognormal_maps(6), "uint8"))
    table.write_into(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(imp.HOST_TABLE_FILES)
    other = imp.HostTable(6, 16, "uint8")
    other.load(str(tmp_path), version=3)
    assert isinstance(other.values, np.memmap) and other.version == 3
    np.testing.assert_array_equal(other.values, table.values)
    np.testing.assert_array_equal(other.steps, table.steps)
    with pytest.raises(ValueError, match="Cannot read the importance table in"):
        imp.HostTable(6, 16, "uint8").load(str(tmp_path / "missing"), version=1)
    with pytest.raises(ValueError, match="table of shape \\(7, 16\\) was expected"):
        imp.HostTable(7, 16, "uint8").load(str(tmp_path), version=1)  # a table made for another data set


# -- the model --------------------------------------------------------------------------------------
def test_a_host_model_has_no_table_variable_and_checks_the_location():
    model = famt("host")
    assert model.host_table is not None and model.host_table.shape == (16, 16)
    assert not any("importance_table" in w.path for w in model.weights)
    assert any("refresh_count" in w.path for w in model.weights)  # the phase is still saved with the model
    assert MAE.from_config(model.get_config()).importance_location == "host"
    assert famt("model").host_table is None
    with pytest.raises(ValueError, match="Unknown importance_location 'device'"):
        famt("device")


@pytest.mark.parametrize("storage", ["uint8", "float32"])
def test_host_and_variable_tables_train_the_same(storage):
    """The same table, seed and batches: identical losses and weights, before and after a refresh
    inside `fit` (the host rows of each batch are read when it is taken, after the refresh)."""
    inputs = geometry_inputs(16)
    unaugmented = [(inputs["images"][i:i + 8], inputs["index"][i:i + 8]) for i in (0, 8)]
    runs = {}
    for location in ("model", "host"):
        model = famt(location, storage)
        model.set_importance(lognormal_maps(16))
        model.compile(optimizer=keras.optimizers.AdamW(1e-3))
        pipeline = batches(inputs)
        if location == "host":
            pipeline = data.with_importance(pipeline, model)
        refresh = ImportanceRefresh(lambda: unaugmented, warmup_epochs=1, interval=1)
        runs[location] = model, model.fit(pipeline, epochs=3, callbacks=[refresh], verbose=0).history["loss"]
    (a, loss_a), (b, loss_b) = runs["model"], runs["host"]
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    assert float(to_numpy(b.refresh_count)) == 3 and b.host_table.version == 3  # set once, refreshed twice
    np.testing.assert_allclose(to_numpy(b.importance_maps()), to_numpy(a.importance_maps()), rtol=1e-6)
    for x, y in zip(a.trainable_weights, b.trainable_weights):
        np.testing.assert_allclose(to_numpy(y), to_numpy(x), atol=1e-6, err_msg=x.path)


def test_the_host_table_travels_in_the_keras_file(tmp_path):
    model = famt("host")
    model.set_importance(lognormal_maps(16))
    path = str(tmp_path / "famt.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.importance_location == "host" and loaded.host_table.version == 1
    loaded.sync_importance_phase()
    assert loaded.importance_ready
    np.testing.assert_array_equal(loaded.host_table.values, model.host_table.values)
    np.testing.assert_array_equal(loaded.host_table.steps, model.host_table.steps)
    index = np.array([2, 9])
    np.testing.assert_array_equal(to_numpy(loaded.importance_maps(index)), to_numpy(model.importance_maps(index)))


def test_missing_rows_are_clear_errors():
    inputs = geometry_inputs(16)
    host = famt("host")
    host.set_importance(lognormal_maps(16))
    with pytest.raises(ValueError, match="keeps its importance table on the host") as error:
        host.check_batch(({k: v[:4] for k, v in inputs.items()},), "fit")
    assert "data.with_importance" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="keeps its importance table on the host"):
        host({k: v[:4] for k, v in inputs.items()})
    with pytest.raises(ValueError, match="keeps no importance table on the host"):
        data.with_importance(batches(inputs), famt("model"))
    with pytest.raises(ValueError, match="must be dicts with an image 'index'"):
        data.with_importance(batches(inputs["images"]), host)
