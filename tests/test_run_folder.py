"""A run folder nobody can corrupt: a finished run is not overwritten unless asked, a folder being
written is locked (a stale lock is taken over), `--resume` keeps the run's backend and settings,
and paths that cannot be written are one line before any work."""

import json
import os
import subprocess

import keras
import pytest

import eval as eval_script
import train
from keras_mfm import training
from keras_mfm.checkpoints import LOCK
from tests.conftest import BACKEND
from tests.test_data import write_folder

SMALL = ["--depth", "1", "--batch-size", "8", "--image-size", "16", "--patch-size", "4", "--eval", "none", "--quiet",
         "--epochs", "1", "--steps-per-epoch", "1"]


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def finished_run(tmp_path):
    root = write_folder(str(tmp_path / "set"), per_class=4)
    output = str(tmp_path / "run")
    assert train.main(["--data", root, "--output", output, *SMALL]) == 0
    return root, output


def test_a_finished_run_is_kept_unless_overwrite_is_asked(finished_run, capsys):
    root, output = finished_run
    before = {name: open(os.path.join(output, name), "rb").read() for name in ("config.json", "history.csv")}
    assert train.main(["--data", root, "--output", output, *SMALL, "--seed", "5"]) == 2
    err = one_error_line(capsys)
    assert f"{output} already holds a run (config.json, history.csv" in err and "--overwrite replaces it" in err
    for name, content in before.items():  # nothing of the finished run was touched
        assert open(os.path.join(output, name), "rb").read() == content
    assert train.main(["--data", root, "--output", output, *SMALL, "--seed", "5", "--overwrite"]) == 0
    assert json.load(open(os.path.join(output, "config.json")))["config"]["seed"] == 5
    assert not os.path.exists(os.path.join(output, LOCK))  # released at the end


def test_a_folder_being_written_is_locked_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    root = write_folder(str(tmp_path / "set"), per_class=4)
    output = str(tmp_path / "run")
    os.makedirs(output)
    import socket

    lock = os.path.join(output, LOCK)
    with open(lock, "w") as handle:  # a live writer: this very process
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, handle)
    assert train.main(["--data", root, "--output", output, *SMALL]) == 2
    err = one_error_line(capsys)
    assert f"is being written by process {os.getpid()}" in err and LOCK in err
    assert not os.path.exists(os.path.join(output, "config.json"))

    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is free now: the lock of a killed run
    with open(lock, "w") as handle:
        json.dump({"host": socket.gethostname(), "pid": gone.pid}, handle)
    assert train.main(["--data", root, "--output", output, *SMALL]) == 0
    assert not os.path.exists(lock)


def test_resume_refuses_other_settings_and_another_backend(finished_run, capsys):
    _, output = finished_run
    assert train.main(["--resume", "--output", output, "--epochs", "5", "--lr", "1", "--method", "mae", "--quiet"]) == 2
    err = one_error_line(capsys)
    assert "these flags differ: --epochs 5 (the run has 1); --lr 1.0 (the run has None); --method mae (the run " \
           "has mfm)" in err
    # flags equal to the record are fine: the run is finished, nothing more to train
    assert train.main(["--resume", "--output", output, "--epochs", "1", "--quiet"]) == 0
    other = next(b for b in ("tensorflow", "jax", "torch") if b != BACKEND)
    assert train.main(["--resume", "--output", output, "--backend", other, "--quiet"]) == 2
    assert f"was trained on the {BACKEND} backend; --resume continues it there" in one_error_line(capsys)
    # the Python API refuses too (another backend draws other random streams)
    record = json.load(open(os.path.join(output, "config.json")))
    record["backend"] = other
    json.dump(record, open(os.path.join(output, "config.json"), "w"))
    with pytest.raises(training.TrainingError, match=f"trained on the {other} backend.*--backend {other}"):
        training.resume(output)


def test_paths_that_cannot_be_written_are_one_line_before_any_work(finished_run, tmp_path, capsys):
    root, output = finished_run
    a_file = str(tmp_path / "a_file")
    open(a_file, "w").close()
    assert train.main(["--data", root, "--output", a_file, *SMALL]) == 2
    assert f"--output {a_file} is a file, not a folder" in one_error_line(capsys)
    assert train.main(["--data", root, "--output", os.path.join(a_file, "run"), *SMALL]) == 2
    assert "Not a directory" in one_error_line(capsys)
    encoder = os.path.join(output, "encoder.keras")
    assert eval_script.main(["knn", "--encoder", encoder, "--data", root, "--output",
                             os.path.join(a_file, "metrics.json")]) == 2
    assert f"cannot be written: {a_file} is a file, not a folder" in one_error_line(capsys)
    assert keras.saving.load_model(encoder) is not None  # the run is untouched


def test_evaluation_data_problems_stop_the_run_before_pre_training(tmp_path, capsys):
    root = write_folder(str(tmp_path / "set"), per_class=4, splits=("train",))  # no test/ split
    output = str(tmp_path / "run")
    argv = ["--data", root, "--output", output, *[a for a in SMALL if a not in ("--eval", "none")], "--eval", "knn"]
    assert train.main(argv) == 2
    assert "test" in one_error_line(capsys)
    assert not os.path.exists(os.path.join(output, "checkpoint.keras"))  # no step was trained


def test_history_rows_travel_in_the_checkpoint_so_an_epoch_end_kill_loses_none(tmp_path):
    root = write_folder(str(tmp_path / "set"), per_class=4)
    output = str(tmp_path / "run")
    argv = ["--data", root, "--output", output, *SMALL[:-4], "--epochs", "2",
            "--steps-per-epoch", "1"]
    assert train.main(argv) == 0
    path = os.path.join(output, "history.csv")
    rows = open(path).read().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,")
    # a kill after epoch 1's checkpoint, before its row reached the CSV
    open(path, "w").write("\n".join(rows[:2]) + "\n")
    assert train.main(["--resume", "--output", output, "--quiet"]) == 0
    assert open(path).read().splitlines() == rows


def test_a_checkpoint_of_another_run_or_data_set_is_refused_on_resume(finished_run, tmp_path, capsys):
    root, output = finished_run
    other = str(tmp_path / "other")
    assert train.main(["--data", root, "--output", other, *SMALL, "--method", "sr"]) == 0
    checkpoint = os.path.join(output, "checkpoint.keras")
    os.replace(os.path.join(other, "checkpoint.keras"), checkpoint)  # an SR checkpoint in the MFM run's folder
    assert train.main(["--resume", "--output", output, "--quiet"]) == 2
    assert "is not this run's: it was trained with method 'sr' where this run has 'mfm'" in one_error_line(capsys)

    assert train.main(["--data", root, "--output", other, *SMALL, "--overwrite"]) == 0
    write_folder(os.path.join(root, "more"), classes=("cat",), per_class=2, splits=("x",))
    os.replace(os.path.join(root, "more", "x", "cat"), os.path.join(root, "train", "cat", "more"))
    with pytest.raises(training.TrainingError, match="train_images 8 where this run has 10"):
        training.resume(other)


def test_a_full_disk_leaves_no_temporary_file_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    import errno

    root = write_folder(str(tmp_path / "set"), per_class=4)
    output = str(tmp_path / "run")
    save = keras.Model.save

    def disk_full(model, path, *args, **kwargs):
        open(path, "wb").write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(keras.Model, "save", disk_full)
    assert train.main(["--data", root, "--output", output, *SMALL]) == 2
    assert "No space left on device" in one_error_line(capsys)
    assert sorted(os.listdir(output)) == ["config.json"]  # no temporary checkpoint, no lock
    json.load(open(os.path.join(output, "config.json")))
    monkeypatch.setattr(keras.Model, "save", save)
    assert train.main(["--resume", "--output", output, "--quiet"]) == 0
    assert not [name for name in os.listdir(output) if ".tmp" in name]


def test_json_written_atomically_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    from keras_mfm import checkpoints

    path = str(tmp_path / "config.json")
    checkpoints.write_json_atomically(path, {"a": 1})

    def half_written(values, handle, **kwargs):
        handle.write('{"a": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.json, "dump", half_written)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.write_json_atomically(path, {"a": 2})
    assert json.load(open(path)) == {"a": 1} and os.listdir(tmp_path) == ["config.json"]
