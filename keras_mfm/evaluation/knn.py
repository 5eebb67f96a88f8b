"""Weighted k-NN on frozen-encoder features (DINO's protocol).

k-NN: features are L2-normalised; each test image takes its `k` most cosine-similar training
images, each votes for its class with weight `exp(similarity / temperature)`, and the class with
the largest total wins (k = 20, temperature = 0.07 as in DINO).
"""

import time

import numpy as np
from keras import ops

from keras_mfm.backbones.wrapped import as_encoder
from keras_mfm.evaluation.features import Result, default_pooling, extract_split_features, load_evaluation_data


def knn_predict(train_features, train_labels, test_features, k=20, temperature=0.07, num_classes=None, chunk=1024):
    """Weighted k-NN class predictions, `(N_test,)` int, computed with `keras.ops`."""
    train_features = np.asarray(train_features, "float32")
    test_features = np.asarray(test_features, "float32")
    train_labels = np.asarray(train_labels, "int64")
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"Features must be (N, D) with the same D, got {train_features.shape} and {test_features.shape}."
        )
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} training features but {len(train_labels)} labels.")
    if not 1 <= k <= len(train_features):
        raise ValueError(f"`k` must be in [1, {len(train_features)}] (the training images), got {k}.")
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    num_classes = int(num_classes or train_labels.max() + 1)
    bank = ops.normalize(ops.convert_to_tensor(train_features), axis=-1)
    bank_labels = ops.convert_to_tensor(train_labels.astype("int32"))
    predictions = []
    for start in range(0, len(test_features), chunk):
        queries = ops.normalize(ops.convert_to_tensor(test_features[start:start + chunk]), axis=-1)
        similarity = ops.matmul(queries, ops.transpose(bank))
        top_similarity, top_index = ops.top_k(similarity, k)
        neighbour_labels = ops.take(bank_labels, top_index)
        weights = ops.exp(top_similarity / temperature)
        votes = ops.sum(ops.one_hot(neighbour_labels, num_classes) * weights[..., None], axis=1)
        predictions.append(ops.convert_to_numpy(ops.argmax(votes, axis=-1)))
    return np.concatenate(predictions).astype("int64")


def knn_accuracy(train, test, k=20, temperature=0.07):
    """Top-1 accuracy (%) of weighted k-NN with `train`/`test` `Features`."""
    predictions = knn_predict(train.features, train.labels, test.features, k, temperature)
    return 100.0 * float(np.mean(predictions == test.labels))


def evaluate_knn(encoder, train_dataset, test_dataset, k=20, temperature=0.07, pooling=None, verbose=0):
    """Extracts features of both splits (`(images, labels)` batches) and returns a `Result` with
    `knn_top1` (%)."""
    start = time.perf_counter()
    train, test = extract_split_features(encoder, [train_dataset, test_dataset], pooling, verbose)
    return Result({
        "protocol": "knn",
        "knn_top1": knn_accuracy(train, test, k, temperature),
        "k": k,
        "temperature": temperature,
        "pooling": pooling or default_pooling(encoder),
        "train_images": int(len(train.labels)),
        "test_images": int(len(test.labels)),
        "seconds": time.perf_counter() - start,
    })


def evaluate_knn_on_data(encoder, source, batch_size=256, train_images=None, test_images=None, seed=0,
                         k=20, temperature=0.07, pooling=None, verbose=0):
    """`evaluate_knn` on a data source (spec or `DataSource`): seeded subsets of its splits when
    `train_images`/`test_images` are given, each image resized to the encoder's size."""
    encoder = as_encoder(encoder)
    splits = load_evaluation_data(source, train_images, test_images, seed)
    return evaluate_knn(encoder, *splits.datasets(encoder.image_size, batch_size), k=k, temperature=temperature,
                        pooling=pooling, verbose=verbose)
