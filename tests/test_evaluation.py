import numpy as np
import pytest

from keras_mfm import backbones, evaluation
from tests.helpers_subprocess import run_python
from tests.conftest import BACKEND, to_numpy


def numpy_knn(train, labels, test, k, temperature, classes):
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = []
    for query in test:
        similarity = train @ query
        top = np.argsort(-similarity, kind="stable")[:k]
        votes = np.zeros(classes)
        for index in top:
            votes[labels[index]] += np.exp(similarity[index] / temperature)
        out.append(np.argmax(votes))
    return np.array(out)


def test_knn_matches_numpy_reference():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(200, 16)), rng.normal(size=(50, 16))
    labels = rng.integers(0, 5, size=200)
    got = evaluation.knn_predict(train, labels, test, k=7, temperature=0.1, chunk=16)
    np.testing.assert_array_equal(got, numpy_knn(train, labels, test, 7, 0.1, 5))


def test_knn_hand_case():
    # neighbours of (1, 0): (1, 0.1) class 0 (sim 0.995), (0, 1) class 1 (sim 0), (-1, 0) class 1 (-1)
    train = np.array([[1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    labels = np.array([0, 1, 1])
    assert evaluation.knn_predict(train, labels, np.array([[1.0, 0.0]]), k=3, temperature=0.07)[0] == 0
    # with a huge temperature the votes are nearly counts: two class-1 neighbours win
    assert evaluation.knn_predict(train, labels, np.array([[1.0, 0.0]]), k=3, temperature=1e6)[0] == 1


def test_knn_separable_and_shuffled_labels():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 32)) * 5
    labels = rng.integers(0, 4, size=400)
    features = centres[labels] + rng.normal(size=(400, 32))
    train = evaluation.Features(features[:300], labels[:300])
    test = evaluation.Features(features[300:], labels[300:])
    assert evaluation.knn_accuracy(train, test) > 98
    shuffled = evaluation.Features(features[:300], rng.permutation(labels[:300]))
    assert abs(evaluation.knn_accuracy(shuffled, test) - 25) < 15


def test_knn_bad_input():
    with pytest.raises(ValueError, match="`k`"):
        evaluation.knn_predict(np.ones((3, 2)), np.zeros(3), np.ones((1, 2)), k=5)
    with pytest.raises(ValueError, match="same D"):
        evaluation.knn_predict(np.ones((3, 2)), np.zeros(3), np.ones((1, 3)), k=1)


def test_extract_features_pooling():
    encoder = backbones.ViTBackbone(image_size=8, patch_size=4, hidden_dim=8, depth=1, num_heads=2)
    images = np.random.default_rng(0).random((5, 8, 8, 3)).astype("float32")
    dataset = [(images[:3], np.array([0, 1, 2])), (images[3:], np.array([3, 4]))]
    result = evaluation.extract_features(encoder, dataset)
    assert result.features.shape == (5, 8) and list(result.labels) == [0, 1, 2, 3, 4]
    tokens = to_numpy(encoder(images))
    np.testing.assert_allclose(result.features, tokens[:, 0], atol=1e-5)
    mean = evaluation.extract_features(encoder, dataset, pooling="mean").features
    np.testing.assert_allclose(mean, tokens[:, 1:].mean(1), atol=1e-5)


def test_eval_cli_knn_random_init(tmp_path):
    from tests.test_data import write_folder

    root = write_folder(str(tmp_path / "set"), per_class=6)
    out = str(tmp_path / "metrics.json")
    result = run_python(["eval.py", "knn", "--random-init", "vit_tiny", "--data", root, "--image-size", "16",
                         "--k", "3", "--output", out], BACKEND)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "knn: top-1" in result.stdout
    import json

    metrics = json.load(open(out))
    assert metrics["train_images"] == 12 and metrics["test_images"] == 12 and 0 <= metrics["knn_top1"] <= 100


def test_extract_split_features_equals_one_by_one():
    encoder = backbones.ViTBackbone(image_size=8, patch_size=4, hidden_dim=8, depth=1, num_heads=2)
    images = np.random.default_rng(1).random((5, 8, 8, 3)).astype("float32")
    first, second = [(images[:3], np.array([0, 1, 2]))], [(images[3:], np.array([3, 4]))]
    both = evaluation.extract_split_features(encoder, [first, second], pooling="mean")
    for got, dataset in zip(both, (first, second)):
        want = evaluation.extract_features(encoder, dataset, pooling="mean")
        np.testing.assert_allclose(got.features, want.features, atol=1e-6)
        np.testing.assert_array_equal(got.labels, want.labels)
