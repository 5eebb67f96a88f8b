"""Crash safety: a run killed with SIGKILL mid-epoch resumes to exactly the uninterrupted run; a NaN
stops the run and keeps the last good checkpoint; corrupt files are clear errors."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import train
from keras_mfm import checkpoints, data, training
from tests.conftest import BACKEND, REPO, to_numpy
from tests.helpers_subprocess import run_python
from tests.test_data import write_folder

RUN = ["--method", "famt", "--epochs", "3", "--steps-per-epoch", "6", "--batch-size", "8", "--image-size", "16",
       "--patch-size", "4", "--depth", "1", "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
       "--refresh-warmup", "1", "--refresh-interval", "5", "--checkpoint-steps", "1", "--seed", "3",
       "--eval", "none", "--quiet"]


def history(output):
    with open(os.path.join(output, "history.csv")) as handle:
        return [(row["epoch"], float(row["loss"]), float(row["lr"])) for row in csv.DictReader(handle)]


def read_position(output):
    try:
        with open(os.path.join(output, checkpoints.CHECKPOINT_STATE)) as handle:
            state = json.load(handle)
        return state["epochs_done"], state["steps_done"]
    except (OSError, ValueError):
        return None


def test_pretraining_epoch_is_a_function_of_seed_epoch_and_step(tmp_path):
    split = data.load_split(write_folder(str(tmp_path / "set"), per_class=8), "train")
    def epoch(e, skip=0, seed=1):
        return [b.numpy() for b in data.pretraining_epoch(split, 16, 4, 6, e, seed, skip)]
    first = epoch(1)
    assert len(first) == 6  # 6 steps of 4 from 16 images: the epoch spans two passes
    for a, b in zip(first, epoch(1)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(first[2:], epoch(1, skip=2)):  # a resume at step 2 sees the same batches
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], epoch(2)[0]) and not np.array_equal(first[0], epoch(1, seed=2)[0])


DISTRIBUTED = ["--distribute", "--cpu-devices", "2"]


@pytest.mark.parametrize("devices", [
    pytest.param(1, marks=pytest.mark.slow_on("jax", "tensorflow")),  # XLA / graph tracing: 2-8x PyTorch's time
    pytest.param(2, marks=[pytest.mark.slow_on("jax"),
                           pytest.mark.skipif(BACKEND == "torch", reason="Keras has no data-parallel fit on PyTorch")]),
])
def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, devices):
    """On one device, and data-parallel on 2 virtual (JAX) or logical (TensorFlow) CPU devices."""
    root = write_folder(str(tmp_path / "set"), per_class=8)
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    run = RUN + (DISTRIBUTED if devices > 1 else [])

    def start(output):
        return subprocess.Popen([sys.executable, "train.py", "--data", root, "--output", output, *run], env=env,
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    uninterrupted, process = start(straight), start(killed)  # side by side: the machine has 2 cores
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        position = read_position(killed)
        if position and position >= (1, 2):  # inside epoch 1 (of 0..2), after the refresh at its start
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read()[-3000:]
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    epochs_done, steps_done = read_position(killed)
    assert (epochs_done, steps_done) < (3, 0) and steps_done > 0, (epochs_done, steps_done)
    assert not os.path.isfile(os.path.join(killed, "encoder.keras"))
    # whatever moment the kill hit, checkpoint.keras is a complete checkpoint
    model, state = checkpoints.load_checkpoint(os.path.join(killed, checkpoints.CHECKPOINT))
    assert state["epochs_done"] >= 1

    result = run_python(["train.py", "--resume", "--output", killed, "--quiet"], BACKEND)
    assert result.returncode == 0, result.stderr[-3000:]
    want, got = history(straight), history(killed)
    assert [row[0] for row in got] == ["0", "1", "2"]
    np.testing.assert_allclose([row[1:] for row in got], [row[1:] for row in want], rtol=1e-5)
    a = keras.saving.load_model(os.path.join(straight, "checkpoint.keras"))
    b = keras.saving.load_model(os.path.join(killed, "checkpoint.keras"))
    for x, y in zip(a.weights, b.weights):  # encoder, decoder, refresh count (and a variable table), optimizer
        np.testing.assert_allclose(to_numpy(x), to_numpy(y), atol=1e-5, err_msg=x.path)
    assert b.importance_location == "host"  # train.py's table: on the host, in the checkpoint's assets
    np.testing.assert_array_equal(b.host_table.values, a.host_table.values)
    np.testing.assert_array_equal(b.host_table.steps, a.host_table.steps)
    assert not np.all(b.host_table.values == b.host_table.values[0, 0])  # filled by the refresh
    np.testing.assert_allclose(to_numpy(a.optimizer.iterations), to_numpy(b.optimizer.iterations))
    info = json.load(open(os.path.join(killed, "config.json")))
    if devices > 1:
        assert info["distribution"]["num_replicas"] == 2
    assert info["importance_refreshes"] == []  # epoch 1's refresh is in the checkpoint, not redone
    assert float(to_numpy(b.refresh_count)) == 1


def test_nan_in_the_data_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    root = write_folder(str(tmp_path / "set"), per_class=8)
    real_epoch = data.pretraining_epoch

    def poisoned(*args, **kwargs):  # epoch 1 gets a NaN image in its third batch
        batches = real_epoch(*args, **kwargs)
        if args[4] != 1:
            return batches
        import tensorflow as tf

        def poison(position, images):
            bad = tf.fill(tf.shape(images), float("nan"))
            return tf.where(position == 2, bad, images)

        return batches.enumerate().map(poison)

    monkeypatch.setattr(data, "pretraining_epoch", poisoned)
    output = str(tmp_path / "run")
    argv = ["--data", root, "--output", output, "--epochs", "3", "--steps-per-epoch", "4", "--batch-size", "8",
            "--image-size", "16", "--patch-size", "4", "--depth", "1", "--checkpoint-steps", "1", "--eval", "none",
            "--quiet"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    # the bad batch is caught as it is made, before a step trains on it
    assert "train.py: error: MFM.fit: images contain NaN or infinite values" in err and "(epoch 1)" in err, err
    assert "last good checkpoint is" in err and len(err.strip().splitlines()) == 1, err
    model, state = checkpoints.load_checkpoint(os.path.join(output, checkpoints.CHECKPOINT))
    assert (state["epochs_done"], state["steps_done"]) == (1, 2)  # after the last finite step
    assert all(np.all(np.isfinite(to_numpy(w))) for w in model.weights)
    assert not os.path.isfile(os.path.join(output, "encoder.keras"))


@pytest.mark.parametrize("what", ["checkpoint", "encoder"])
def test_truncated_files_are_clear_errors(tmp_path, what):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = str(tmp_path / f"{what}.keras")
    model.save(path)
    content = open(path, "rb").read()
    open(path, "wb").write(content[: len(content) // 2])
    with pytest.raises(training.TrainingError, match=f"Cannot load the {what} file .*{what}.keras.*truncated"):
        training.load_model_file(path, what)


def test_loading_is_safe_mode(tmp_path):
    """A .keras file with a Python lambda (arbitrary code) is refused."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda x: x * 2)])
    path = str(tmp_path / "lambda.keras")
    model.save(path)
    with pytest.raises(training.TrainingError, match="Cannot load the encoder file"):
        training.load_model_file(path, "encoder")
