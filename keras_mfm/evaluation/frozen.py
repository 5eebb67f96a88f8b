"""The frozen-encoder protocols (k-NN and linear probe) on one extraction of the features."""

import time

from keras_mfm.backbones.wrapped import as_encoder
from keras_mfm.evaluation.features import Result, default_pooling, extract_split_features, load_evaluation_data
from keras_mfm.evaluation.knn import knn_accuracy
from keras_mfm.evaluation.linear_probe import linear_probe_on_features

FROZEN_PROTOCOLS = ("knn", "linear")


def evaluate_frozen_on_data(encoder, source, protocols=FROZEN_PROTOCOLS, batch_size=256, train_images=None,
                            test_images=None, seed=0, pooling=None, k=20, temperature=0.07, probe_epochs=90,
                            probe_batch_size=256, verbose=0):
    """k-NN and/or linear probe of `encoder` on a data source, sharing the extracted features.

    Returns a `Result` with `knn_top1` and/or `linear_top1` (+ the linear probe's details under
    `"linear"`); `.classifier` is the linear probe's classifier when it ran.
    """
    protocols = list(protocols)
    for protocol in protocols:
        if protocol not in FROZEN_PROTOCOLS:
            raise ValueError(f"Unknown frozen-encoder protocol {protocol!r}; choose from {FROZEN_PROTOCOLS}.")
    start = time.perf_counter()
    encoder = as_encoder(encoder)
    splits = load_evaluation_data(source, train_images, test_images, seed)
    pooling = pooling or default_pooling(encoder)
    train, test = extract_split_features(encoder, splits.datasets(encoder.image_size, batch_size), pooling, verbose)
    metrics = {"protocols": protocols, "pooling": pooling, "train_images": int(len(train.labels)),
               "test_images": int(len(test.labels)), "feature_seconds": time.perf_counter() - start}
    classifier = None
    if "knn" in protocols:
        metrics.update({"knn_top1": knn_accuracy(train, test, k, temperature), "k": k, "temperature": temperature})
    if "linear" in protocols:
        probe = linear_probe_on_features(encoder, train, test, class_names=splits.class_names, pooling=pooling,
                                         epochs=probe_epochs, batch_size=probe_batch_size, seed=seed,
                                         verbose=verbose)
        metrics["linear_top1"] = probe["linear_top1"]
        metrics["linear"] = dict(probe)
        classifier = probe.classifier
    metrics["seconds"] = time.perf_counter() - start
    return Result(metrics, classifier=classifier)
