"""Robustness of a classifier: top-1 under common corruptions and under an FGSM attack.

Corruptions (`keras_mfm.corruptions`, CIFAR-10-C parameters scaled to the image size): Gaussian
noise, Gaussian blur, JPEG, contrast, and low-/high-pass filtering of the spectrum, each at
severities 1-5, applied to the test images; reported per corruption and severity, per corruption
(mean over severities) and as the mean over all corruptions and severities.

FGSM (Goodfellow et al.): `x_adv = clip(x + epsilon * sign(d CE(f(x), y) / d x), 0, 1)` on
images in [0, 1] (epsilon 1/255 by default), one step, classifier in inference mode.
"""

import time

import keras
import numpy as np
from keras import ops

from keras_mfm import corruptions as corruption_lib
from keras_mfm.backend import input_gradient
from keras_mfm.evaluation.features import Result
from keras_mfm.inputs import progress_bar


def fgsm(classifier, images, labels, epsilon):
    """One-step FGSM adversarial images for int `labels` `(B,)`; `images` `(B, H, W, 3)` in [0, 1]."""
    labels = ops.convert_to_tensor(np.asarray(labels, "int32"))

    def loss(x):
        logits = classifier(x, training=False)
        return ops.sum(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))

    gradient = input_gradient(loss, images)
    return ops.clip(ops.convert_to_tensor(images, "float32") + epsilon * ops.sign(gradient), 0.0, 1.0)


def epsilon_name(epsilon):
    """1/255 -> "1/255" (the usual way to write FGSM budgets), else "%g"."""
    steps = epsilon * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 and steps > 0 else f"{epsilon:g}"


def check_class_count(classifier, class_names):
    """Clear error when a classifier is scored on data with other classes."""
    if len(class_names) != classifier.num_classes:
        raise ValueError(
            f"The classifier has {classifier.num_classes} classes but the data has {len(class_names)} "
            f"({', '.join(class_names[:10])}{'...' if len(class_names) > 10 else ''})."
        )
    if classifier.class_names and list(classifier.class_names) != list(class_names):
        raise ValueError(
            f"The classifier's classes {classifier.class_names} are not the data's classes {class_names}."
        )


def robustness(classifier, test_dataset, corruptions=None, severities=(1, 2, 3, 4, 5), fgsm_epsilons=(1 / 255,),
               seed=0, verbose=0):
    """Top-1 (%) of `classifier` on clean, corrupted and FGSM-perturbed test images.

    Args:
        classifier: a model `images in [0, 1] -> logits`, e.g. `ImageClassifier` from `finetune`
            or `linear_probe`.
        test_dataset: `(images, int labels)` batches of the classifier's image size.
        corruptions: names from `keras_mfm.corruptions.CORRUPTIONS` (default: all).
        severities: ints in 1..5.
        fgsm_epsilons: FGSM step sizes in [0, 1] pixel units (empty: no attack).
        seed: seed of the Gaussian-noise corruption.

    Returns:
        `Result` with `clean_top1`, `corruptions` (`{name: {severity: top1}}`),
        `corruption_means` (`{name: mean over severities}`), `mean_corruption_top1` and `fgsm`
        (`{epsilon: top1}`).
    """
    start = time.perf_counter()
    names = list(corruptions or corruption_lib.CORRUPTIONS)
    for name in names:
        if name not in corruption_lib.CORRUPTIONS:
            raise ValueError(f"Unknown corruption {name!r}; choose from {sorted(corruption_lib.CORRUPTIONS)}.")
    severities = [int(s) for s in severities]
    for severity in severities:
        if severity not in corruption_lib.SEVERITIES:
            raise ValueError(f"Severities are ints in 1..5, got {severity}.")
    for epsilon in fgsm_epsilons:
        if not 0 <= epsilon <= 1:
            raise ValueError(f"FGSM epsilons are in [0, 1] (pixel units of images in [0, 1]), got {epsilon}.")
    noise_seed = keras.random.SeedGenerator(seed)

    correct = {"clean": 0}
    total = 0
    image_size = None
    progress = progress_bar(test_dataset, verbose)
    for images, labels in test_dataset:
        images, labels = np.asarray(images, "float32"), np.asarray(labels, "int64")
        image_size = images.shape[1:3]
        total += len(labels)

        def hits(batch):
            logits = np.asarray(classifier.predict_on_batch(np.asarray(keras.ops.convert_to_numpy(batch))))
            return int(np.sum(np.argmax(logits, axis=-1) == labels))

        correct["clean"] += hits(images)
        for name in names:
            for severity in severities:
                key = (name, severity)
                corrupted = corruption_lib.corrupt(images, name, severity, seed=noise_seed)
                correct[key] = correct.get(key, 0) + hits(corrupted)
        for epsilon in fgsm_epsilons:
            key = ("fgsm", epsilon)
            correct[key] = correct.get(key, 0) + hits(fgsm(classifier, images, labels, epsilon))
        if progress:
            progress.add(1)
    if total == 0:
        raise ValueError("The test data set is empty.")

    accuracy = {key: 100.0 * count / total for key, count in correct.items()}
    table = {name: {str(s): accuracy[(name, s)] for s in severities} for name in names}
    means = {name: float(np.mean(list(row.values()))) for name, row in table.items()}
    return Result(
        {
            "protocol": "robustness",
            "clean_top1": accuracy["clean"],
            "corruptions": table,
            "corruption_means": means,
            "mean_corruption_top1": float(np.mean(list(means.values()))) if means else None,
            "corruption_parameters": {
                name: {str(s): corruption_lib.corruption_parameter(name, s, tuple(image_size)) for s in severities}
                for name in names
            },
            "fgsm": {epsilon_name(e): accuracy[("fgsm", e)] for e in fgsm_epsilons},
            "test_images": total,
            "seconds": time.perf_counter() - start,
        }
    )


def robustness_on_data(classifier, source, batch_size=256, test_images=None, seed=0, verbose=0, **options):
    """`robustness` on the test split of a data source; checks the classes match the classifier."""
    from keras_mfm import data

    if isinstance(source, str):
        source = data.resolve_data(source)
    test = data.load_split(source, "test", limit=test_images, seed=seed)
    if test.class_names:
        check_class_count(classifier, list(test.class_names))
    dataset = data.evaluation_dataset(test, classifier.image_size, batch_size, cache=False)
    return robustness(classifier, dataset, seed=seed, verbose=verbose, **options)
