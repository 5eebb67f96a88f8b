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
