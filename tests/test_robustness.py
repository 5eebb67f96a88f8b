import keras
import numpy as np
import pytest

from keras_mfm import evaluation, models
from tests.conftest import to_numpy
from tests.test_linear_probe import batches, coloured_images, tiny_vit


def linear_image_model(seed=0, size=2, classes=3):
    rng = np.random.default_rng(seed)
    model = keras.Sequential([keras.Input((size, size, 3)), keras.layers.Flatten(), keras.layers.Dense(classes)])
    kernel = rng.normal(size=(size * size * 3, classes)).astype("float32")
    bias = rng.normal(size=(classes,)).astype("float32")
    model.layers[-1].set_weights([kernel, bias])
    return model, kernel, bias


def test_fgsm_matches_the_analytic_gradient_of_a_linear_model():
    model, kernel, bias = linear_image_model()
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, size=(4, 2, 2, 3)).astype("float32")
    labels = np.array([0, 1, 2, 1])
    # d CE / d x = W (softmax(W^T x + b) - onehot(y))
    logits = images.reshape(4, -1) @ kernel + bias
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    gradient = ((probabilities - np.eye(3)[labels]) @ kernel.T).reshape(images.shape)
    epsilon = 8 / 255
    expected = np.clip(images + epsilon * np.sign(gradient), 0, 1)
    got = to_numpy(evaluation.fgsm(model, images, labels, epsilon))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # the attack raises the loss
    def ce(x):
        z = x.reshape(4, -1) @ kernel + bias
        z = z - z.max(-1, keepdims=True)
        return -(z[np.arange(4), labels] - np.log(np.exp(z).sum(-1))).mean()
    assert ce(got) > ce(images)


@pytest.fixture(scope="module")
def trained_probe():
    keras.utils.set_random_seed(0)
    images, labels = coloured_images(480, 3)
    result = evaluation.linear_probe(tiny_vit(), batches(images[:384], labels[:384], 128),
                                     batches(images[384:], labels[384:], 128), class_names=["a", "b", "c"],
                                     epochs=40, batch_size=32, base_lr=2.0, warmup_epochs=2)
    return result.classifier, images[384:], labels[384:]


@pytest.mark.slow_on("jax", "tensorflow")  # the same check runs on PyTorch in the default run
def test_robustness_report(trained_probe):
    classifier, images, labels = trained_probe
    test = batches(images, labels, 40)
    result = evaluation.robustness(classifier, test, corruptions=["contrast", "low_pass", "jpeg"],
                                   severities=[1, 5], fgsm_epsilons=[0.0, 1 / 255, 0.5])
    logits, _ = evaluation.predict_logits(classifier, test)
    assert result["clean_top1"] == pytest.approx(evaluation.top1(logits, labels))
    assert set(result["corruptions"]) == {"contrast", "low_pass", "jpeg"}
    assert set(result["corruptions"]["jpeg"]) == {"1", "5"}
    assert result["corruption_means"]["jpeg"] == pytest.approx(np.mean(list(result["corruptions"]["jpeg"].values())))
    assert result["mean_corruption_top1"] == pytest.approx(np.mean(list(result["corruption_means"].values())))
    assert set(result["fgsm"]) == {"0", "1/255", "0.5"}
    assert result["fgsm"]["0"] == pytest.approx(result["clean_top1"])  # no step, no change
    assert result["fgsm"]["0.5"] <= result["clean_top1"]
    assert result["test_images"] == len(labels)
    assert result["corruption_parameters"]["low_pass"]["5"] < result["corruption_parameters"]["low_pass"]["1"]


def test_robustness_bad_input(trained_probe):
    classifier, images, labels = trained_probe
    test = batches(images[:8], labels[:8])
    with pytest.raises(ValueError, match="Unknown corruption"):
        evaluation.robustness(classifier, test, corruptions=["fog"])
    with pytest.raises(ValueError, match="1..5"):
        evaluation.robustness(classifier, test, severities=[6])
    with pytest.raises(ValueError, match="FGSM"):
        evaluation.robustness(classifier, test, fgsm_epsilons=[2.0])
    with pytest.raises(ValueError, match="3 classes but the data has 2"):
        evaluation.check_class_count(classifier, ["x", "y"])
    with pytest.raises(ValueError, match="not the data's classes"):
        evaluation.check_class_count(classifier, ["x", "y", "z"])
    evaluation.check_class_count(classifier, ["a", "b", "c"])
    assert isinstance(classifier, models.ImageClassifier)
