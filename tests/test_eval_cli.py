"""eval.py end to end on a few real CIFAR-10 images, in-process on the current backend."""

import importlib.util
import json
import os

import keras
import numpy as np
import pytest

from keras_mfm import backbones
from tests.conftest import REPO


def load_cli():
    spec = importlib.util.spec_from_file_location("eval_cli", os.path.join(REPO, "eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    keras.utils.set_random_seed(0)
    encoder = backbones.ViTBackbone(image_size=32, patch_size=8, hidden_dim=32, depth=1, num_heads=2)
    encoder(np.zeros((1, 32, 32, 3), "float32"))
    path = str(tmp_path_factory.mktemp("encoder") / "encoder.keras")
    encoder.save(path)
    return path


SUBSET = ["--train-images", "64", "--test-images", "32", "--batch-size", "32"]


def run(capsys, *args):
    code = load_cli().main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow_on("jax", "tensorflow")  # the same check runs on PyTorch in the default run
def test_every_subcommand_on_cifar10(cifar_root, encoder_file, tmp_path, capsys):
    out = tmp_path / "m.json"
    code, stdout, stderr = run(capsys, "knn", "--encoder", encoder_file, "--data", cifar_root, *SUBSET, "--k", "5",
                               "--output", out)
    assert code == 0, stderr
    assert "knn: top-1" in stdout and json.load(open(out))["train_images"] == 64

    code, stdout, stderr = run(capsys, "linear", "--encoder", encoder_file, "--data", cifar_root, *SUBSET,
                               "--epochs", "2", "--save-classifier", tmp_path / "probe.keras", "--output", out)
    assert code == 0, stderr
    metrics = json.load(open(out))
    assert "linear: top-1" in stdout and 0 <= metrics["linear_top1"] <= 100 and metrics["epochs"] == 2
    assert os.path.isfile(tmp_path / "probe.keras")

    code, stdout, stderr = run(capsys, "finetune", "--encoder", encoder_file, "--data", cifar_root, *SUBSET,
                               "--epochs", "1", "--save-classifier", tmp_path / "ft.keras", "--output", out)
    assert code == 0, stderr
    metrics = json.load(open(out))
    assert "finetune: top-1" in stdout and len(metrics["train_loss"]) == 1 and metrics["steps_per_epoch"] == 2
    assert metrics["mixup"] == 0.8 and metrics["rand_augment"] == 9

    code, stdout, stderr = run(capsys, "robustness", "--classifier", tmp_path / "ft.keras", "--data", cifar_root,
                               "--test-images", "16", "--severities", "1,5", "--fgsm-epsilon", "1/255,2/255",
                               "--output", out)
    assert code == 0, stderr
    metrics = json.load(open(out))
    assert "robustness: clean" in stdout and metrics["test_images"] == 16
    assert set(metrics["corruptions"]) == {"gaussian_noise", "gaussian_blur", "jpeg", "contrast", "low_pass",
                                           "high_pass"}
    assert set(metrics["fgsm"]) == {"1/255", "2/255"}

    # without a classifier: a linear probe on the encoder first
    code, stdout, stderr = run(capsys, "robustness", "--encoder", encoder_file, "--data", cifar_root, *SUBSET,
                               "--probe-epochs", "1", "--corruptions", "contrast", "--severities", "3",
                               "--fgsm-epsilon", "", "--output", out)
    assert code == 0, stderr
    metrics = json.load(open(out))
    assert metrics["linear_probe"]["epochs"] == 1 and list(metrics["corruptions"]) == ["contrast"]


def test_bad_input_gets_clear_errors(cifar_root, encoder_file, tmp_path, capsys):
    from tests.test_data import write_folder

    code, _, stderr = run(capsys, "linear", "--encoder", tmp_path / "missing.keras", "--data", cifar_root)
    assert code == 2 and "No encoder file" in stderr

    not_encoder = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    not_encoder.save(tmp_path / "dense.keras")
    code, _, stderr = run(capsys, "knn", "--encoder", tmp_path / "dense.keras", "--data", cifar_root)
    assert code == 2 and "not an encoder" in stderr

    (tmp_path / "junk.keras").write_bytes(b"not a zip file")
    code, _, stderr = run(capsys, "knn", "--encoder", tmp_path / "junk.keras", "--data", cifar_root)
    assert code == 2 and "corrupt" in stderr

    code, _, stderr = run(capsys, "robustness", "--classifier", encoder_file, "--data", cifar_root)
    assert code == 2 and "not a classifier" in stderr

    train_only = write_folder(str(tmp_path / "train_only"), splits=("train",), size=(32, 32))
    code, _, stderr = run(capsys, "linear", "--encoder", encoder_file, "--data", train_only)
    assert code == 2 and "test" in stderr

    code, _, stderr = run(capsys, "knn", "--encoder", encoder_file, "--data", cifar_root, "--image-size", "64")
    assert code == 2 and "cannot take --image-size 64" in stderr

    # a 10-class classifier on 2-class data
    probe = tmp_path / "probe.keras"
    code, _, stderr = run(capsys, "linear", "--encoder", encoder_file, "--data", cifar_root, *SUBSET,
                          "--epochs", "1", "--save-classifier", probe)
    assert code == 0, stderr
    two_classes = write_folder(str(tmp_path / "two"), size=(32, 32))
    code, _, stderr = run(capsys, "robustness", "--classifier", probe, "--data", two_classes)
    assert code == 2 and "10 classes but the data has 2" in stderr

    code, _, stderr = run(capsys, "robustness", "--classifier", probe, "--data", cifar_root, "--corruptions", "fog")
    assert code == 2 and "Unknown corruption" in stderr

    with pytest.raises(SystemExit):  # argparse: exactly one model source
        load_cli().main(["knn", "--data", cifar_root])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        load_cli().main(["knn", "--encoder", encoder_file, "--data", cifar_root, "--batch-size", "0"])
    assert "argument --batch-size: must be >= 1, got 0" in capsys.readouterr().err


# -- eval.py show ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def show_run(tmp_path_factory):
    """A run directory as train.py leaves it (a tiny MFM trained one epoch), and a 16x16 image folder."""
    from keras_mfm import methods
    from tests.conftest import smooth_images
    from tests.test_data import write_folder

    root = tmp_path_factory.mktemp("show")
    keras.utils.set_random_seed(0)
    encoder = backbones.ViTBackbone(image_size=16, patch_size=4, hidden_dim=32, depth=1, num_heads=2)
    model = methods.build_method("mfm", encoder)
    model.build((None, 16, 16, 3))
    model.compile(optimizer="adam")
    model.fit(smooth_images(8, 16), epochs=1, batch_size=4, verbose=0)
    run_dir = root / "run"
    run_dir.mkdir()
    model.save(run_dir / "checkpoint.keras")
    encoder.save(run_dir / "encoder.keras")
    (run_dir / "history.csv").write_text("epoch,epoch_seconds,images_per_second,loss,lr\n"
                                         "0,1.5,5.3,0.9,0.001\n1,1.2,6.6,0.7,0.0005\n")
    data_dir = write_folder(str(root / "data"), size=(16, 16))
    return run_dir, data_dir


def test_show_writes_the_figures_of_a_run(show_run, tmp_path, capsys):
    run_dir, data_dir = show_run
    out = tmp_path / "figures"
    code, stdout, stderr = run(capsys, "show", "--run", run_dir, "--data", data_dir, "--output", out,
                               "--images", "2", "--dpi", "40")
    assert code == 0, stderr
    names = ("reconstruction.png", "history.png", "corruptions.png")
    assert stdout.split() == [str(out / name) for name in names]
    for name in names:
        assert os.path.getsize(out / name) > 1000, name
    from PIL import Image

    assert Image.open(out / "reconstruction.png").size == (360, 150)  # 6 panels x 1.5 in, 2 x 1.75 + 0.25 in, 40 dpi

    # --checkpoint without a history.csv beside it: no history.png; --history names one explicitly
    lone = tmp_path / "lone"
    lone.mkdir()
    os.link(run_dir / "checkpoint.keras", lone / "model.keras")
    code, stdout, stderr = run(capsys, "show", "--checkpoint", lone / "model.keras", "--data", data_dir,
                               "--output", tmp_path / "f2", "--images", "2", "--dpi", "40", "--image-size", "16")
    assert code == 0, stderr
    assert [os.path.basename(p) for p in stdout.split()] == ["reconstruction.png", "corruptions.png"]
    code, stdout, stderr = run(capsys, "show", "--checkpoint", lone / "model.keras", "--data", data_dir,
                               "--output", tmp_path / "f3", "--images", "2", "--dpi", "40",
                               "--history", run_dir / "history.csv")
    assert code == 0 and "history.png" in stdout, stderr


def test_show_errors_are_one_clear_line(show_run, tmp_path, capsys):
    run_dir, data_dir = show_run
    out = ["--data", data_dir, "--output", tmp_path / "out", "--images", "2"]

    def error(*args):
        code, _, stderr = run(capsys, "show", *args, *out)
        assert code == 2
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("eval.py show: error: "), stderr
        return last

    assert "No checkpoint file at" in error("--checkpoint", tmp_path / "missing.keras")
    assert "No checkpoint file at" in error("--run", tmp_path / "not_a_run")
    assert "holds a ViTBackbone, which is not a keras_mfm pre-training model" in error(
        "--checkpoint", run_dir / "encoder.keras")
    (tmp_path / "junk.keras").write_bytes(b"not a zip file")
    assert "corrupt" in error("--checkpoint", tmp_path / "junk.keras")
    assert "No history file at" in error("--run", run_dir, "--history", tmp_path / "none.csv")
    assert "cannot take --image-size 32" in error("--run", run_dir, "--image-size", "32")
    assert not (tmp_path / "out").exists()  # nothing written before the inputs check out
    with pytest.raises(SystemExit):  # argparse: exactly one of --checkpoint / --run
        load_cli().main(["show", "--run", str(run_dir), "--checkpoint", str(run_dir / "checkpoint.keras"),
                         *map(str, out)])
