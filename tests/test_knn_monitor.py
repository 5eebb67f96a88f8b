"""The k-NN monitor: in `fit` it logs what `evaluate_knn` gives for the encoder at that moment;
in a run it writes `knn_top1` into history.csv every N epochs, equal to a k-NN of the saved encoder."""

import csv
import math
import os

import keras
import numpy as np
import pytest

from keras_mfm import evaluation, training
from tests.test_data import write_folder
from tests.test_inputs import tiny_mfm
from tests.test_linear_probe import batches, coloured_images


def test_monitor_logs_the_knn_of_the_encoder_every_n_epochs():
    keras.utils.set_random_seed(0)
    images, labels = coloured_images(48, 3, size=16)
    bank, held_out = batches(images[:32], labels[:32], 16), batches(images[32:], labels[32:], 16)
    model = tiny_mfm()
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    monitor = evaluation.KNNMonitor(bank, held_out, every=2, k=5)
    history = model.fit(images, epochs=4, batch_size=16, callbacks=[monitor], verbose=0, shuffle=False).history
    scores = history["knn_top1"]
    assert math.isnan(scores[0]) and math.isnan(scores[2]) and not math.isnan(scores[3])
    assert [epoch for epoch, _ in monitor.history] == [1, 3]
    # the last score is the k-NN of the trained encoder, computed independently
    expected = evaluation.evaluate_knn(model.encoder, bank, held_out, k=5)["knn_top1"]
    assert scores[3] == pytest.approx(expected, abs=1e-9)
    assert 0 <= scores[1] <= 100 and history["knn_seconds"][3] > 0


def test_monitor_refuses_a_bad_interval():
    with pytest.raises(ValueError, match="`every` must be >= 1 epoch, got 0"):
        evaluation.KNNMonitor([], [], every=0)
    with pytest.raises(ValueError, match="--monitor-knn must be >= 1 epoch, got 0"):
        training.validate(training.PretrainConfig(monitor_knn=0))


@pytest.mark.slow_on("jax", "tensorflow")  # end to end: XLA / graph tracing make it 2-8x the PyTorch time
def test_run_writes_knn_top1_to_history_equal_to_a_knn_of_the_saved_encoder(tmp_path):
    root = write_folder(str(tmp_path / "set"), per_class=12, size=(16, 16))
    output = str(tmp_path / "run")
    config = training.PretrainConfig(
        method="mfm", depth=1, image_size=16, patch_size=4, batch_size=4, lr=1e-3, epochs=2, data=root,
        output=output, eval="knn", monitor_knn=1, verbose=0,
    )
    result = training.pretrain(config)
    with open(os.path.join(output, "history.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert all(0 <= float(row["knn_top1"]) <= 100 for row in rows)
    encoder = keras.saving.load_model(result["encoder_path"])
    again = evaluation.evaluate_knn_on_data(encoder, root, batch_size=4)
    # the final monitor score and the run's own final k-NN are the same number
    assert float(rows[-1]["knn_top1"]) == pytest.approx(again["knn_top1"], abs=1e-6)
    assert result["info"]["evaluation"]["knn_top1"] == pytest.approx(again["knn_top1"], abs=1e-6)
    assert np.isfinite(float(rows[-1]["knn_seconds"]))
