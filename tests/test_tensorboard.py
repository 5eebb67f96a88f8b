"""keras_mfm.tensorboard: scalars and reconstruction images of a run, readable by TensorBoard, on every backend."""

import glob
import io
import os

import keras
import numpy as np
import pytest
from PIL import Image

from keras_mfm import backbones, methods, tensorboard, visualize
from tests.conftest import smooth_images


class AddLearningRate(keras.callbacks.Callback):
    """What `training.EpochStats` does to the logs (before the TensorBoard callbacks)."""

    def on_epoch_end(self, epoch, logs=None):
        logs["lr"] = 1e-3 * (epoch + 1)


def tiny_mfm():
    keras.utils.set_random_seed(0)
    encoder = backbones.ViTBackbone(image_size=16, patch_size=4, hidden_dim=32, depth=1, num_heads=2)
    model = methods.build_method("mfm", encoder)
    model.build((None, 16, 16, 3))
    model.compile(optimizer="adam")
    return model


def read_events(folder):
    """`[(step, tag, plugin, value)]` of every summary in a folder's event files (TensorFlow only)."""
    import tensorflow as tf

    files = sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*")))
    assert files, f"no event file in {folder}"
    events = []
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                events.append((event.step, value.tag, value.metadata.plugin_data.plugin_name,
                               tf.make_ndarray(value.tensor)))
    return events


def test_fit_logs_scalars_and_reconstructions(tmp_path):
    model = tiny_mfm()
    images = smooth_images(2, 16, seed=1)
    callbacks = tensorboard.tensorboard_callbacks(str(tmp_path), images, every_n_epochs=1)
    assert [type(c) for c in callbacks] == [keras.callbacks.TensorBoard, tensorboard.ReconstructionImages]
    history = model.fit(smooth_images(8, 16), epochs=2, batch_size=4, verbose=0,
                        callbacks=[AddLearningRate(), *callbacks])

    scalars = {(step, tag): (plugin, float(value)) for step, tag, plugin, value in read_events(tmp_path / "train")}
    assert {(0, "epoch_loss"), (1, "epoch_loss"), (0, "epoch_lr"), (1, "epoch_lr")} <= set(scalars)
    assert {scalars[(0, "epoch_loss")][0], scalars[(0, "epoch_lr")][0]} == {"scalars"}
    for epoch, loss in enumerate(history.history["loss"]):
        assert scalars[(epoch, "epoch_loss")][1] == pytest.approx(loss, rel=1e-6)
        assert scalars[(epoch, "epoch_lr")][1] == pytest.approx(1e-3 * (epoch + 1))

    summaries = read_events(tmp_path / "images")
    assert [(step, tag, plugin) for step, tag, plugin, _ in summaries] == [
        (0, "reconstruction", "images"), (1, "reconstruction", "images")]
    width, height, png = summaries[-1][3]  # TensorBoard's image tensor: [width, height, PNG]
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    columns, rows = 6, 2  # MFM: image, spectrum, input, spectrum, prediction, spectrum; one row per image
    expected = (int((visualize.PANEL_HEIGHT * rows + visualize.TITLE_HEIGHT) * 100),
                int(visualize.PANEL_WIDTH * columns * 100), 3)
    assert picture.shape == (int(height), int(width), 3) == expected
    assert picture.std() > 20


def test_reconstruction_schedule_and_bad_arguments(tmp_path):
    images = smooth_images(1, 16)
    callback = tensorboard.ReconstructionImages(str(tmp_path), images, every_n_epochs=3)
    callback.set_params({"epochs": 7})
    assert [epoch for epoch in range(7) if callback.due(epoch)] == [2, 5, 6]  # every 3rd and the last
    run = tensorboard.ReconstructionImages(str(tmp_path), images, every_n_epochs=3, epochs=7)
    run.set_params({"epochs": 2})  # one `fit` per epoch (training.py): the run's last epoch counts
    assert [epoch for epoch in range(7) if run.due(epoch)] == [2, 5, 6]
    assert len(tensorboard.tensorboard_callbacks(str(tmp_path))) == 1  # scalars only without images
    with pytest.raises(ValueError, match="every_n_epochs"):
        tensorboard.ReconstructionImages(str(tmp_path), images, every_n_epochs=0)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        tensorboard.ReconstructionImages(str(tmp_path), images[0], every_n_epochs=1)
    encoder = backbones.ViTBackbone(image_size=16, patch_size=4, hidden_dim=32, depth=1, num_heads=2)
    callback.set_model(encoder)
    with pytest.raises(ValueError, match="not a keras_mfm pre-training model"):
        callback.on_train_begin()  # before the first epoch, not after it

