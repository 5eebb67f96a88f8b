"""MAE's linear probe (SPEC.md section 2, "Recipe"): a linear classifier on frozen features.

    features = pool(encoder(x))             ([CLS] token of a ViT, global average of a ResNet)
    logits   = W . BatchNorm_no_affine(features) + b

trained with LARS (momentum 0.9, no weight decay, trust coefficient 0.001), per-step warm-up (10 of
90 epochs) then cosine to 0, cross-entropy, peak lr 6.4: MAE's `0.1 x batch / 256` at its batch of
16,384. LARS scales each layer's step to `lr x 0.001 x ||w||`, so the step size does not depend on
the batch, and re-scaling the lr down to small batches starves the probe: on CIFAR-10 features
(10,000 images, batch 256, 3,600 steps) `0.1 x 256 / 256 = 0.1` reached 27 % top-1 where 6.4
reached 38 % and 20 reached 41 % (docs/benchmarks.md). `base_lr` restores the scaling rule. The
encoder is frozen, so its features are extracted once (no augmentation) and the head is trained on
the cached arrays, which makes the 90 epochs cheap.
"""

import math
import time

import keras
import numpy as np

from keras_mfm.backbones.wrapped import as_encoder
from keras_mfm.evaluation.features import (
    Result,
    default_pooling,
    extract_split_features,
    load_evaluation_data,
    top1,
)
from keras_mfm.models.classifier import ImageClassifier
from keras_mfm.optimizers.lars import LARS
from keras_mfm.optimizers.recipes import warmup_cosine_schedule


def check_labels(labels, num_classes, what):
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"The {what} labels go up to {int(labels.max())} but the classifier has {num_classes} "
            "classes: the data and the classifier do not match."
        )


def shuffled_batches(features, batch_size, epochs, seed=0):
    """`(features, labels)` batches of `epochs` passes, each in a new seeded random order."""
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(features.labels))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield features.features[index], features.labels[index]


MAE_PROBE_LR = 0.1 * 16384 / 256  # 6.4


def peak_lr(lr=MAE_PROBE_LR, base_lr=None, batch_size=256):
    """The probe's peak lr: `base_lr * batch_size / 256` when `base_lr` is given, else `lr`."""
    value = lr if base_lr is None else base_lr * batch_size / 256
    if not value > 0:
        raise ValueError(f"The linear probe's learning rate must be positive, got {value}.")
    return value


def train_linear_head(head, train, epochs=90, batch_size=256, lr=MAE_PROBE_LR, warmup_epochs=10,
                      weight_decay=0.0, verbose=0, seed=0, base_lr=None):
    """Trains `head` (`(B, D) -> logits`) on cached `Features` with MAE's LARS recipe.

    Returns the peak learning rate used.
    """
    if epochs < 1:
        raise ValueError(f"`epochs` must be >= 1, got {epochs}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    steps_per_epoch = math.ceil(len(train.labels) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), total_steps)
    lr = peak_lr(lr, base_lr, batch_size)
    inputs = keras.Input((train.features.shape[1],))
    model = keras.Model(inputs, head(inputs), name="linear_probe")
    model.compile(
        optimizer=LARS(warmup_cosine_schedule(lr, total_steps, warmup_steps), weight_decay=weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # One `fit` epoch per probe epoch costs a data-adapter set-up each (slow on the torch backend for
    # a tiny head), so the shuffled epochs are streamed as one pass of `total_steps` batches.
    model.fit(shuffled_batches(train, batch_size, epochs, seed), steps_per_epoch=total_steps, epochs=1,
              verbose=verbose)
    return lr


def linear_probe(encoder, train_dataset, test_dataset, num_classes=None, class_names=None, pooling=None,
                 epochs=90, batch_size=256, lr=MAE_PROBE_LR, warmup_epochs=10, weight_decay=0.0, seed=0,
                 verbose=0, base_lr=None):
    """Linear probe of a frozen `encoder`.

    Args:
        train_dataset, test_dataset: `(images in [0, 1], int labels)` batches of the encoder's size
            (e.g. `keras_mfm.data.evaluation_dataset`).
        num_classes: default: largest training label + 1 (or `len(class_names)`).
        pooling: ViT features, "cls" (MAE's probe, the default) or "mean".
        epochs, batch_size, lr, warmup_epochs, weight_decay: the head's training (MAE's recipe,
            peak lr 6.4, see the module docstring); `base_lr` instead gives
            `lr = base_lr * batch_size / 256`.
        seed: seeds Keras (head initialisation, shuffling).

    Returns:
        `Result` with `linear_top1` and `train_top1` (%); `.classifier` is an `ImageClassifier`
        (encoder + trained head) for images, e.g. for `robustness`.
    """
    start = time.perf_counter()
    pooling = pooling or default_pooling(encoder)
    train, test = extract_split_features(encoder, [train_dataset, test_dataset], pooling, verbose)
    feature_seconds = time.perf_counter() - start
    result = linear_probe_on_features(encoder, train, test, num_classes, class_names, pooling, epochs, batch_size,
                                      lr, warmup_epochs, weight_decay, seed, verbose, base_lr)
    result.update({"feature_seconds": feature_seconds, "seconds": time.perf_counter() - start})
    return result


def linear_probe_on_features(encoder, train, test, num_classes=None, class_names=None, pooling=None, epochs=90,
                             batch_size=256, lr=MAE_PROBE_LR, warmup_epochs=10, weight_decay=0.0, seed=0, verbose=0,
                             base_lr=None):
    """`linear_probe` on `Features` already extracted with `pooling` (e.g. shared with k-NN)."""
    start = time.perf_counter()
    if seed is not None:
        keras.utils.set_random_seed(seed)
    pooling = pooling or default_pooling(encoder)
    if num_classes is None:
        num_classes = len(class_names) if class_names else int(train.labels.max()) + 1
    check_labels(train.labels, num_classes, "training")
    check_labels(test.labels, num_classes, "test")

    classifier = ImageClassifier(encoder, num_classes, pooling=pooling, head="linear_probe",
                                 class_names=class_names, name="linear_probe_classifier")
    classifier.build()
    lr = train_linear_head(classifier.head, train, epochs, batch_size, lr, warmup_epochs, weight_decay,
                           verbose, seed=seed or 0, base_lr=base_lr)
    predict = classifier.head.predict
    return Result(
        {
            "protocol": "linear",
            "linear_top1": top1(predict(test.features, batch_size=4096, verbose=0), test.labels),
            "train_top1": top1(predict(train.features, batch_size=4096, verbose=0), train.labels),
            "pooling": pooling,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "num_classes": num_classes,
            "train_images": int(len(train.labels)),
            "test_images": int(len(test.labels)),
            "seconds": time.perf_counter() - start,
        },
        classifier=classifier,
    )


def linear_probe_on_data(encoder, source, batch_size=256, train_images=None, test_images=None, seed=0,
                         verbose=0, **options):
    """`linear_probe` on a data source (spec or `DataSource`); `options` go to `linear_probe`.

    `batch_size` is the feature-extraction batch; the head's is `options["probe_batch_size"]`.
    """
    encoder = as_encoder(encoder)
    splits = load_evaluation_data(source, train_images, test_images, seed)
    options["batch_size"] = options.pop("probe_batch_size", 256)
    return linear_probe(
        encoder,
        *splits.datasets(encoder.image_size, batch_size),
        class_names=splits.class_names,
        seed=seed,
        verbose=verbose,
        **options,
    )
