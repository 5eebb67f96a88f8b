"""The image input contract (keras_mfm.inputs) at `fit`, and AMT/FAMT on a user's own data
(`data.with_index`, `data.indexed_batches`, `ImportanceRefresh` in a plain `model.fit`)."""

import os

import keras
import numpy as np
import pytest

from keras_mfm import backbones, data, inputs, models
from tests.conftest import REPO


def tiny_vit(size=16):
    return backbones.ViTBackbone(image_size=size, patch_size=4, hidden_dim=32, depth=1, num_heads=2)


def tiny_mfm():
    return models.MFM(tiny_vit(), seed=0)


def tiny_mae(**kwargs):
    return models.MAE(tiny_vit(), decoder_dim=32, decoder_depth=1, decoder_heads=2, seed=0, **kwargs)


def unit_images(count=8, size=16, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (count, size, size, 3)).astype("float32")


@pytest.mark.parametrize("images, message", [
    (unit_images() * 255, r"must be in \[0, 1\]; got values in \[.*, 2\d\d.*\]: divide 0-255 pixels by 255"),
    ((unit_images() * 255).astype("uint8"), "must be floats in \\[0, 1\\]; got uint8: divide 0-255 pixels by 255"),
    (unit_images() * 4 - 2, r"must be in \[0, 1\]; got values in \[-2.*: keras_mfm normalises internally"),
    (np.transpose(unit_images(), (0, 3, 1, 2)), "need 3 channels in the last axis.*channels first"),
    (unit_images(size=28), "images are 28x28, the model takes 16x16"),
    (unit_images()[0], r"must be a \(batch, height, width, 3\) array; got shape \(16, 16, 3\)"),
])
@pytest.mark.parametrize("build", [tiny_mfm, tiny_mae], ids=["mfm", "mae"])
def test_fit_refuses_images_outside_the_contract(build, images, message):
    model = build()
    model.compile(optimizer="adam")
    with pytest.raises(inputs.ImageInputError, match=message):
        model.fit(images, epochs=1, batch_size=4, verbose=0)
    assert model.optimizer.iterations.numpy() == 0  # not a single step was taken


def test_a_nan_pixel_is_named_before_training():
    images = unit_images()
    images[3, 2, 1, 0] = np.nan
    model = tiny_mfm()
    model.compile(optimizer="adam")
    with pytest.raises(inputs.ImageInputError, match="1 NaN or infinite value"):
        model.fit(images, epochs=1, batch_size=4, verbose=0)


def test_fit_checks_the_first_batch_of_a_tf_data_pipeline_and_an_empty_one():
    import tensorflow as tf

    model = tiny_mfm()
    model.compile(optimizer="adam")
    batches = tf.data.Dataset.from_tensor_slices(unit_images() * 255).batch(4)
    with pytest.raises(inputs.ImageInputError, match="MFM.fit: images must be in"):
        model.fit(batches, epochs=1, verbose=0)
    with pytest.raises(inputs.ImageInputError, match="MFM.fit: the data set is empty"):
        model.fit(batches.take(0), epochs=1, verbose=0)
    # integer pixels are refused from the pipeline's element spec, before any image is read
    with pytest.raises(inputs.ImageInputError, match="MFM.fit: images must be floats in \\[0, 1\\]; got uint8"):
        model.fit(batches.map(lambda x: tf.cast(x, "uint8")), epochs=1, verbose=0)
    # a bad batch later in the pipeline stops the run with the same one line
    images = unit_images(12)
    images[9, 0, 0, 0] = np.nan
    model = tiny_mfm()  # a fresh model: a fit stopped inside Keras' loop may leave JAX's state half-synced
    model.compile(optimizer="adam")
    with pytest.raises(inputs.ImageInputError, match="MFM.fit: images contain NaN or infinite values"):
        model.fit(tf.data.Dataset.from_tensor_slices(images).batch(4), epochs=1, verbose=0)


def test_fit_reads_a_pipeline_once_so_a_reshuffling_order_is_the_one_trained_on():
    import tensorflow as tf

    seen = []

    def record(x):
        seen.append(1)
        return x

    images = unit_images(8)
    pipeline = tf.data.Dataset.from_tensor_slices(images).map(
        lambda x: tf.ensure_shape(tf.py_function(record, [x], tf.float32), (16, 16, 3))).batch(4)
    plain = tiny_mfm()
    plain.build((None, 16, 16, 3))  # built: Keras' fit reads a batch to build an unbuilt model
    plain.compile(optimizer="adam")
    keras.Model.fit(plain, pipeline, epochs=1, verbose=0)  # Keras' own fit, without the checks
    reads = len(seen)
    seen.clear()
    model = tiny_mfm()
    model.build((None, 16, 16, 3))
    model.compile(optimizer="adam")
    model.fit(pipeline, epochs=1, verbose=0)
    assert reads == 8 and len(seen) == reads  # the checks added no pass over the data


def test_images_in_range_train_with_the_usual_loss():
    keras.utils.set_random_seed(0)
    model = tiny_mfm()
    model.compile(optimizer="adam")
    history = model.fit(unit_images(), epochs=1, batch_size=4, verbose=0)
    assert 0.0 < history.history["loss"][-1] < 10.0  # 0-255 input would give hundreds


def test_a_diverging_fit_stops_with_one_message():
    keras.utils.set_random_seed(0)
    model = tiny_mfm()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e12))
    with pytest.raises(models.base.NonFiniteLossError, match=r"The loss became (nan|inf) in epoch 0 \(batch \d+\)"):
        model.fit(unit_images(32), epochs=3, batch_size=4, verbose=0)


def test_famt_without_index_is_refused():
    model = tiny_mae(mask_ratio=0.45, throw_ratio=0.4, importance="famt", num_images=8)
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match="FAMT looks up each image's importance map by its index.*with_index"):
        model.fit(unit_images(), epochs=1, batch_size=4, verbose=0)


def test_with_index_of_arrays_and_of_a_tf_data_pipeline():
    import tensorflow as tf

    images = unit_images(5)
    x = data.with_index(images)
    assert x["index"].tolist() == [0, 1, 2, 3, 4] and x["box"].shape == (5, 4) and x["flip"].tolist() == [0] * 5
    np.testing.assert_array_equal(x["images"], images)
    elements = list(data.with_index(tf.data.Dataset.from_tensor_slices((images, np.arange(5)))).as_numpy_iterator())
    assert [e["index"] for e in elements] == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(elements[2]["images"], images[2])
    np.testing.assert_array_equal(elements[2]["box"], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="before batching"):
        data.with_index(tf.data.Dataset.from_tensor_slices(images).batch(2))
    with pytest.raises(ValueError, match="box must be"):
        data.with_index(images, box=np.zeros((4, 4)))
    batches = list(data.indexed_batches(images, 2))
    assert [b[1].tolist() for b in batches] == [[0, 1], [2, 3], [4]]


def readme_example(name):
    """The Python block after `<!-- example: NAME -->` in the README."""
    text = open(os.path.join(REPO, "README.md")).read()
    start = text.index(f"<!-- example: {name} -->")
    start = text.index("```python\n", start) + len("```python\n")
    return text[start:text.index("```", start)]


def test_famt_on_your_own_data_as_the_readme_shows():
    """The README's example, run as written: FAMT in a plain `model.fit` on a NumPy array."""
    keras.utils.set_random_seed(0)
    namespace = {}
    exec(compile(readme_example("famt-own-data"), "README.md", "exec"), namespace)
    model, refresh, images = namespace["model"], namespace["refresh"], namespace["images"]
    assert [epoch for epoch, _ in refresh.history] == [1, 2]
    assert model.importance_ready and float(keras.ops.convert_to_numpy(model.refresh_count)) == 2
    table = keras.ops.convert_to_numpy(model.importance_table)
    assert table.shape == (len(images), 64) and not np.allclose(table, 1.0)  # filled with scored maps
    assert np.all(np.isfinite(model.history.history["loss"]))
    assert tuple(model.counts) == (28, 26, 10)  # the authors' counts at 64 patches: masked, thrown, visible


def test_progress_bars_know_the_number_of_batches():
    import tensorflow as tf

    assert inputs.progress_bar([1, 2, 3], verbose=0) is None
    assert inputs.progress_bar([1, 2, 3], verbose=1).target == 3
    finite = tf.data.Dataset.range(10).batch(4)
    assert inputs.progress_bar(finite, verbose=1).target == 3
    assert inputs.progress_bar(finite.repeat(), verbose=1).target is None  # infinite: no total
    assert inputs.progress_bar(iter([1, 2]), verbose=1).target is None  # a generator: unknown
