"""train.py end to end (a fresh process on the current backend) and its error messages."""

import csv
import json
import os

import keras
import numpy as np
import pytest

import train
from tests.conftest import BACKEND, CIFAR_ARCHIVE
from tests.helpers_subprocess import run_python
from tests.test_data import write_folder

SMALL = ["--depth", "1", "--batch-size", "8", "--image-size", "16", "--patch-size", "4", "--eval", "none", "--quiet"]


def read_history(output):
    with open(os.path.join(output, "history.csv")) as handle:
        return list(csv.DictReader(handle))


def test_train_writes_encoder_config_history_and_resumes(tmp_path):
    root = write_folder(str(tmp_path / "set"), per_class=8)
    output = str(tmp_path / "run")
    result = run_python(["train.py", "--data", root, "--epochs", "2", "--output", output, *SMALL], BACKEND)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 2 epoch(s) of mfm on " + BACKEND in result.stdout
    for name in ("encoder.keras", "config.json", "history.csv", "checkpoint.keras", "checkpoint.json"):
        assert os.path.isfile(os.path.join(output, name)), name
    info = json.load(open(os.path.join(output, "config.json")))
    assert info["backend"] == BACKEND and info["steps_per_epoch"] == 2 and info["train_images"] == 16
    schedule = info["learning_rate"]  # the warm-up + cosine schedule, not its value at one step
    assert schedule["class_name"] == "WarmupSchedule" and schedule["config"]["total_steps"] == 4
    assert schedule["config"]["peak_lr"] > 0 and schedule["config"]["decay"] == "cosine"
    # MFM's recipe, recorded: timm's cosine over the whole run, min lr 2.5e-6 x B / 512, clip 3.0
    assert info["recipe"]["name"] == "mfm" and info["recipe"]["clip_norm"] == 3.0 and info["init"] == "mfm"
    assert not schedule["config"]["warmup_prefix"]
    history = read_history(output)
    assert [row["epoch"] for row in history] == ["0", "1"]
    assert all(np.isfinite(float(row["loss"])) for row in history)
    encoder = keras.saving.load_model(os.path.join(output, "encoder.keras"))
    assert tuple(encoder(np.zeros((1, 16, 16, 3), "float32")).shape) == (1, 17, 192)

    # resuming a finished run trains nothing and keeps its history (tests/test_resume.py kills one)
    result = run_python(["train.py", "--resume", "--output", output, "--quiet"], BACKEND)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["epoch"] for row in read_history(output)] == ["0", "1"]


@pytest.mark.slow_on("jax", "tensorflow")  # end to end: XLA / graph tracing make it 2-8x the PyTorch time
def test_famt_run_refreshes_the_importance_and_resumes_with_it(tmp_path):
    root = write_folder(str(tmp_path / "set"), per_class=8)
    output = str(tmp_path / "famt")
    small = [arg for arg in SMALL]
    args = ["train.py", "--method", "famt", "--data", root, "--epochs", "3", "--output", output, *small,
            "--refresh-warmup", "1", "--refresh-interval", "1", "--decoder-dim", "32", "--decoder-depth", "1",
            "--decoder-heads", "2"]
    result = run_python(args, BACKEND)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.load(open(os.path.join(output, "config.json")))
    assert [r["epoch"] for r in info["importance_refreshes"]] == [1, 2]
    assert all(np.isfinite(float(row["loss"])) for row in read_history(output))
    # the checkpoint holds the filled table and its refresh count (tests/test_resume.py resumes one)
    checkpoint = keras.saving.load_model(os.path.join(output, "checkpoint.keras"))
    assert float(keras.ops.convert_to_numpy(checkpoint.refresh_count)) == 2
    encoder = keras.saving.load_model(os.path.join(output, "encoder.keras"))
    assert encoder.position_embedding_type == "sincos"


@pytest.mark.slow_on("jax", "tensorflow")  # end to end: XLA / graph tracing make it 2-8x the PyTorch time
@pytest.mark.parametrize("method,extra", [
    ("deblur", ["--blur-kernel-sizes", "3", "5", "--tensorboard"]),
    ("simmim_famt", ["--refresh-warmup", "1", "--refresh-interval", "1"]),
])
def test_restoration_and_simmim_runs(tmp_path, method, extra):
    root = write_folder(str(tmp_path / "set"), per_class=8)
    output = str(tmp_path / method)
    assert train.main(["--method", method, "--data", root, "--epochs", "2", "--output", output, *SMALL, *extra]) == 0
    info = json.load(open(os.path.join(output, "config.json")))
    assert info["config"]["method"] == method and np.isfinite(info["final_loss"])
    if method == "simmim_famt":
        assert [r["epoch"] for r in info["importance_refreshes"]] == [1]
    else:  # --tensorboard: scalars every epoch, the reconstruction figure after the last (10% of 2 epochs -> every 1)
        import glob

        assert glob.glob(os.path.join(output, "tensorboard", "train", "events.out.tfevents.*"))
        assert glob.glob(os.path.join(output, "tensorboard", "images", "events.out.tfevents.*"))
    model = keras.saving.load_model(os.path.join(output, "checkpoint.keras"))
    assert model.name == method


def test_help_lists_every_registered_method(capsys):
    from keras_mfm import methods

    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    for name, description in methods.available_methods().items():
        assert f"{name} " in out and description[:30] in out.replace("\n", " "), name
    for flag in ("--outer-radius", "--radius-range", "--focal", "--focal-alpha", "--focal-log", "--focal-batch",
                 "--loss", "--sr-factor", "--blur-sigma", "--noise-sigma", "--mask-patch-size"):
        assert flag in out, flag


@pytest.mark.slow_on("jax", "tensorflow")  # end to end: XLA / graph tracing make it 2-8x the PyTorch time
def test_train_on_real_cifar10_archive(tmp_path):
    if not os.path.isfile(CIFAR_ARCHIVE):
        pytest.skip("no CIFAR-10 archive")
    output = str(tmp_path / "cifar")
    args = ["train.py", "--data", CIFAR_ARCHIVE, "--epochs", "1", "--steps-per-epoch", "3", "--output", output,
            "--depth", "2", "--batch-size", "16", "--quiet", "--eval", "knn,linear",
            "--eval-train-images", "300", "--eval-test-images", "100"]
    result = run_python(args, BACKEND)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.load(open(os.path.join(output, "config.json")))
    assert info["train_images"] == 50_000 and info["class_names"][:2] == ["airplane", "automobile"]
    assert np.isfinite(info["final_loss"])
    metrics = json.load(open(os.path.join(output, "metrics.json")))
    assert metrics["train_images"] == 300 and metrics["test_images"] == 100
    assert 0 <= metrics["knn_top1"] <= 100 and "k-NN top-1" in result.stdout
    assert 0 <= metrics["linear_top1"] <= 100 and "linear top-1" in result.stdout
    assert metrics["linear"]["epochs"] == 90 and metrics["linear"]["train_images"] == 300


@pytest.mark.slow
def test_readme_command_on_this_backend(tmp_path):
    """The issue's acceptance command, as written in the README (about 1-2 minutes per backend)."""
    output = str(tmp_path / "readme")
    args = ["train.py", "--data", CIFAR_ARCHIVE, "--epochs", "1", "--steps-per-epoch", "20", "--output", output,
            "--quiet"]
    result = run_python(args, BACKEND, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--backbone", "vit_huge"], "Unknown backbone 'vit_huge'"),
        (["--method", "simclr"], "Unknown method 'simclr'"),
        (["--image-size", "30"], "not divisible by the patch size"),
        (["--data", "/nonexistent/folder"], "does not exist"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--radius", "40"], "larger than the spectrum"),
        (["--radius", "-2"], "radius"),
        (["--method", "famt", "--backbone", "resnet50", "--image-size", "32"], "needs a ViT backbone"),
        (["--method", "famt", "--refresh-warmup", "0"], "--refresh-warmup must be >= 1"),
        (["--method", "mae", "--mask-ratio", "0.6", "--throw-ratio", "0.4"], "< 1"),
        (["--method", "amt", "--mask-ratio", "0.01"], "masks no token"),
        (["--method", "mae", "--mask-ratio", "0"], "at least one masked patch"),
        (["--method", "deblur", "--blur-sigma", "0"], "sigma"),
        (["--method", "deblur", "--blur-kernel-sizes", "4"], "odd"),
        (["--method", "denoise", "--noise-sigma", "-0.1"], "sigma"),
        (["--method", "sr", "--sr-factor", "3"], "must divide the image height and width"),
        (["--radius", "2", "--outer-radius", "1.5"], "must be larger than `radius`"),
        (["--radius", "2", "--radius-range", "1", "3"], "radius_range"),
        (["--method", "simmim", "--mask-patch-size", "6"], "multiple of the patch size"),
        (["--method", "simmim_famt", "--backbone", "resnet50", "--image-size", "32"], "needs a ViT backbone"),
        (["--checkpoint-steps", "0"], "--checkpoint-steps must be >= 1"),
        (["--tensorboard", "--tensorboard-every", "0"], "--tensorboard-every must be >= 1"),
        (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
        (["--clip-norm", "-1"], "--clip-norm must be >= 0, got -1.0"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--lr", "0.001", "--min-lr", "0.01"], "--min-lr 0.01 is above the peak learning rate 0.001"),
        (["--min-lr", "1"], "--min-lr 1 is above the peak learning rate"),
        (["--gamma", "0"], "--gamma must be > 0"),
        (["--warmup-epochs", "-3"], "--warmup-epochs must be >= 0, got -3.0"),
        (["--epochs", "2", "--warmup-epochs", "5"], "--warmup-epochs 5.0 is longer than the run"),
    ],
)
def test_bad_arguments_give_one_clear_line(tmp_path, capsys, arguments, message):
    root = write_folder(str(tmp_path / "set"), per_class=8)
    argv = ["--data", root, "--output", str(tmp_path / "out"), *SMALL, *arguments]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("train.py: error:") and message in err, err


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert train.main(["--data", str(tmp_path / "empty"), "--output", str(tmp_path / "o"), "--quiet"]) == 2
    assert "no class sub-folders" in capsys.readouterr().err


def test_no_data_and_no_network_names_the_data_flag(tmp_path, capsys, monkeypatch):
    from keras_mfm import data

    monkeypatch.setattr(data, "_network_reachable", lambda *a, **k: False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    assert train.main(["--output", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "cifar10" in err


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    output = tmp_path / "run"
    output.mkdir()
    json.dump({"config": {"data": str(write_folder(str(tmp_path / "set"), per_class=8)), "depth": 1,
                          "batch_size": 8, "image_size": 16}}, open(output / "config.json", "w"))
    (output / "checkpoint.keras").write_bytes(b"truncated garbage")
    assert train.main(["--resume", "--output", str(output), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Cannot load the checkpoint file" in err and "checkpoint.keras" in err


def test_every_setting_has_one_default_and_a_flag():
    """train.py without flags is `PretrainConfig()`, and every field of it can be set by a flag."""
    import dataclasses

    from keras_mfm import training
    from keras_mfm.cli import train as cli_train

    assert cli_train.config_from_args(cli_train.parse_args([])) == training.PretrainConfig()
    parser = cli_train.build_parser([])
    defaults = {}
    for action in parser._actions:
        defaults.setdefault(action.dest, action.default)
    for field in dataclasses.fields(training.PretrainConfig):
        assert field.name in defaults, f"no flag sets {field.name}"
        assert defaults[field.name] == field.default, field.name
    # the defaults read from the models and layers they belong to are the authors' (SPEC)
    config = training.PretrainConfig()
    assert (config.decoder_dim, config.decoder_depth, config.decoder_heads) == (512, 8, 16)
    assert (config.gamma, config.loss, config.masked_loss, config.sr_factor) == (1.0, "frequency", True, 8)
    assert config.noise_sigma == pytest.approx(75 / 255)
    help_text = parser.format_help()
    assert "0.75 mae, 0.45 amt/famt/simmim_famt, 0.6 simmim" in " ".join(help_text.split())


def test_a_truncated_image_is_one_line_naming_it_or_is_skipped(tmp_path, capsys):
    from tests.test_data import _truncated_jpeg

    root = write_folder(str(tmp_path / "set"), per_class=8)
    bad = os.path.join(root, "train", "cat", "truncated.jpg")
    _truncated_jpeg(bad)
    argv = ["--data", root, "--output", str(tmp_path / "out"), *SMALL, "--epochs", "1"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"train.py: error: Image file {bad} cannot be decoded") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert train.main([*argv, "--skip-unreadable", "--overwrite"]) == 0
