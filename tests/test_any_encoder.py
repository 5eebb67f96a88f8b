"""Any Keras model as an encoder (`backbones.as_encoder`): a plain functional model goes through
k-NN, the linear probe and fine-tuning, and its pooling follows its output rank."""

import keras
import numpy as np
import pytest

from keras_mfm import backbones, evaluation, inputs
from tests.conftest import to_numpy
from tests.test_finetune import forever
from tests.test_linear_probe import batches, coloured_images


def functional_encoder(output="vector"):
    """images (B, 8, 8, 3) -> a (B, 16) vector, (B, 16, 16) tokens or a (B, 4, 4, 16) map."""
    images = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(16, 2, strides=2, name="stem")(images)
    if output == "map":
        return keras.Model(images, x, name="conv_map")
    if output == "tokens":
        return keras.Model(images, keras.layers.Reshape((16, 16))(x), name="conv_tokens")
    return keras.Model(images, keras.layers.GlobalAveragePooling2D()(x), name="conv_vector")


@pytest.mark.parametrize("output", ["vector", "tokens", "map"])
def test_pooling_follows_the_output_rank(output):
    model = functional_encoder(output)
    encoder = backbones.as_encoder(model)
    assert encoder.image_size == (8, 8) and encoder.num_features == 16
    images = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype("float32")
    raw = to_numpy(model(images))
    pooled = to_numpy(encoder.pooled_features(encoder(images), "mean"))
    poolings = {"vector": lambda: raw, "tokens": lambda: raw.mean(axis=1), "map": lambda: raw.mean(axis=(1, 2))}
    expected = poolings[output]()
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)
    if output == "tokens":
        np.testing.assert_allclose(to_numpy(encoder.pooled_features(encoder(images), "cls")), raw[:, 0], rtol=1e-6)
        with_cls = backbones.as_encoder(model, cls_token=True)
        np.testing.assert_allclose(to_numpy(with_cls.pooled_features(with_cls(images), "mean")),
                                   raw[:, 1:].mean(axis=1), rtol=1e-5, atol=1e-6)


def test_keras_mfm_encoders_are_used_as_they_are_and_bad_models_are_named():
    vit = backbones.ViTBackbone(image_size=8, patch_size=4, hidden_dim=16, depth=1, num_heads=2)
    assert backbones.as_encoder(vit) is vit
    dynamic = keras.Model(*(lambda i: (i, keras.layers.GlobalAveragePooling2D()(i)))(keras.Input((None, None, 3))))
    with pytest.raises(ValueError, match="one \\(batch, height, width, 3\\) image input of a fixed size"):
        backbones.as_encoder(dynamic)
    with pytest.raises(ValueError, match="expected a Keras model"):
        backbones.as_encoder(np.zeros(3))


def test_a_functional_encoder_goes_through_knn_linear_and_finetune(tmp_path):
    keras.utils.set_random_seed(0)
    model = functional_encoder("vector")
    images, labels = coloured_images(480, 3)
    train, test = batches(images[:384], labels[:384], 128), batches(images[384:], labels[384:], 128)

    knn = evaluation.evaluate_knn(model, train, test, k=5)
    assert knn["knn_top1"] > 95

    probe = evaluation.linear_probe(model, train, test, epochs=40, batch_size=32, base_lr=2.0, warmup_epochs=2)
    assert probe["linear_top1"] > 90
    path = str(tmp_path / "probe.keras")
    probe.classifier.save(path)  # the wrapped model saves inside the classifier
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(reloaded(images[:4])), to_numpy(probe.classifier(images[:4])), atol=1e-5)

    before = [to_numpy(w).copy() for w in model.weights]
    tuned = evaluation.finetune(model, forever(train), test, num_classes=3, epochs=3, steps_per_epoch=4,
                                batch_size=32, base_lr=0.2, warmup_epochs=0, seed=0)
    assert tuned["finetune_top1"] > 60 and tuned["train_loss"][-1] < tuned["train_loss"][0]
    for old, new in zip(before, model.weights):  # the user's model is copied, not trained
        np.testing.assert_array_equal(old, to_numpy(new))


def test_feature_extraction_checks_the_input_contract():
    model = functional_encoder("vector")
    images, labels = coloured_images(32, 2)
    with pytest.raises(inputs.ImageInputError, match="extract_features: images must be in \\[0, 1\\]"):
        evaluation.extract_features(model, batches(images * 255, labels))
    with pytest.raises(inputs.ImageInputError, match="images are 16x16, the model takes 8x8"):
        evaluation.extract_features(model, batches(coloured_images(32, 2, size=16)[0], labels))
