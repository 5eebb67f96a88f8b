import os

import keras
import numpy as np
import pytest

from keras_mfm import backbones, evaluation, models
from keras_mfm.models.classifier import build_head
from tests.conftest import to_numpy


def clusters(seed, n=400, classes=4, dim=32, spread=5.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * spread
    labels = rng.integers(0, classes, size=n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype("float32"), labels


def probe_accuracy(train, test, epochs=30):
    # LARS moves each weight matrix by about lr x 0.001 of its norm per step: MAE's lr (0.1 per 256)
    # is made for thousands of steps, so this few-hundred-step probe takes a larger one.
    head = build_head("linear_probe", 4)
    evaluation.train_linear_head(head, train, epochs=epochs, batch_size=64, base_lr=5.0, warmup_epochs=2)
    return evaluation.top1(to_numpy(head(test.features, training=False)), test.labels)


def test_linear_head_separable_and_shuffled_labels():
    keras.utils.set_random_seed(0)
    features, labels = clusters(0, n=1000)
    train = evaluation.Features(features[:800], labels[:800])
    test = evaluation.Features(features[800:], labels[800:])
    assert probe_accuracy(train, test) > 98
    # labels shuffled independently of the features (in both splits): nothing to learn, chance level
    rng = np.random.default_rng(1)
    shuffled_train = evaluation.Features(features[:800], rng.permutation(labels[:800]))
    shuffled_test = evaluation.Features(features[800:], rng.permutation(labels[800:]))
    assert abs(probe_accuracy(shuffled_train, shuffled_test) - 25) < 12


def coloured_images(n, classes, size=8, seed=0):
    """Class k: a flat colour of its own plus a little noise (trivially separable)."""
    rng = np.random.default_rng(seed)
    palette = rng.uniform(0.1, 0.9, size=(classes, 3))
    labels = np.arange(n) % classes
    images = palette[labels][:, None, None, :] + rng.normal(scale=0.03, size=(n, size, size, 3))
    return np.clip(images, 0, 1).astype("float32"), labels.astype("int64")


def batches(images, labels, size=16):
    return [(images[i:i + size], labels[i:i + size]) for i in range(0, len(images), size)]


def tiny_vit(size=8):
    return backbones.ViTBackbone(image_size=size, patch_size=4, hidden_dim=64, depth=1, num_heads=2)


def test_linear_probe_on_images_and_its_classifier(tmp_path):
    keras.utils.set_random_seed(0)
    encoder = tiny_vit()
    images, labels = coloured_images(480, 3)
    result = evaluation.linear_probe(encoder, batches(images[:384], labels[:384], 128),
                                     batches(images[384:], labels[384:], 128), class_names=["a", "b", "c"],
                                     epochs=40, batch_size=32, base_lr=2.0, warmup_epochs=2)
    assert result["linear_top1"] > 95 and result["train_top1"] > 95
    assert result["protocol"] == "linear" and result["pooling"] == "cls" and result["num_classes"] == 3
    classifier = result.classifier
    assert isinstance(classifier, models.ImageClassifier) and classifier.class_names == ["a", "b", "c"]
    # the classifier on images is the head on the cached features
    features = evaluation.extract_features(encoder, batches(images[384:], labels[384:])).features
    np.testing.assert_allclose(to_numpy(classifier(images[384:])), to_numpy(classifier.head(features)), atol=1e-4)
    # and it saves and loads as .keras
    path = os.path.join(tmp_path, "probe.keras")
    classifier.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(images[:8])), to_numpy(classifier(images[:8])), atol=1e-5)
    assert loaded.class_names == ["a", "b", "c"] and loaded.head_type == "linear_probe"


def test_linear_probe_label_mismatch_is_a_clear_error():
    images, labels = coloured_images(32, 4)
    with pytest.raises(ValueError, match="do not match"):
        evaluation.linear_probe(tiny_vit(), batches(images, labels), batches(images, labels), num_classes=2,
                                epochs=1)


def test_classifier_bad_arguments():
    with pytest.raises(ValueError, match="head"):
        models.ImageClassifier(tiny_vit(), 3, head="mlp")
    with pytest.raises(ValueError, match="2 classes"):
        models.ImageClassifier(tiny_vit(), 1)
    with pytest.raises(ValueError, match="class names"):
        models.ImageClassifier(tiny_vit(), 3, class_names=["a"])


def test_classifier_logits_are_float32_under_mixed_precision():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        classifier = models.ImageClassifier(tiny_vit(), 3)
        logits = classifier(np.zeros((2, 8, 8, 3), "float32"))
    finally:
        keras.config.set_dtype_policy("float32")
    assert keras.backend.standardize_dtype(logits.dtype) == "float32" and tuple(logits.shape) == (2, 3)


def test_probe_learning_rate_rule():
    from keras_mfm.evaluation.linear_probe import peak_lr

    assert peak_lr() == pytest.approx(6.4)  # MAE: 0.1 x 16384 / 256
    assert peak_lr(base_lr=0.1, batch_size=1024) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="positive"):
        peak_lr(lr=0.0)
