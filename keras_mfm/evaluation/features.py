"""What every evaluation protocol shares: frozen-encoder features, predictions, results, data.

Features are pooled encoder outputs `(N, D)`: the [CLS] token or the mean patch token of a ViT,
the global average of a ResNet feature map; the encoder runs in inference mode.
"""

import dataclasses

import keras
import numpy as np

from keras_mfm import inputs
from keras_mfm.inputs import progress_bar


class Result(dict):
    """A protocol's metrics (a JSON-ready dict); `.classifier` holds the trained classifier, if any."""

    def __init__(self, metrics, classifier=None):
        super().__init__(metrics)
        self.classifier = classifier


@dataclasses.dataclass
class Features:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int


def default_pooling(encoder):
    return "cls" if hasattr(encoder, "patch_size") else "mean"


def extract_features(encoder, dataset, pooling=None, verbose=0):
    """Pooled features of `dataset` (`(images, labels)` batches), encoder in inference mode.

    `pooling`: "cls" or "mean" for a ViT (default "cls"), "mean" for ResNet (global average).
    """
    (features,) = extract_split_features(encoder, [dataset], pooling, verbose)
    return features


def extract_split_features(encoder, datasets, pooling=None, verbose=0):
    """`extract_features` of several data sets (e.g. train and test) with one compiled extractor."""
    from keras_mfm.backbones import as_encoder

    encoder = as_encoder(encoder)
    pooling = pooling or default_pooling(encoder)
    # A functional wrapper, so `predict_on_batch` runs one compiled function per batch shape.
    inputs = keras.Input((*encoder.image_size, 3))
    extractor = keras.Model(inputs, encoder.pooled_features(encoder(inputs, training=False), pooling))
    results = []
    for dataset in datasets:
        features, labels = _map_batches(extractor, dataset, verbose, check=tuple(encoder.image_size))
        results.append(Features(features.astype("float32"), labels))
    return results


def predict_logits(classifier, dataset, verbose=0):
    """`(logits (N, classes), labels (N,))` of a classifier over `(images, labels)` batches."""
    return _map_batches(classifier, dataset, verbose)


def top1(logits, labels):
    """Top-1 accuracy in %."""
    return 100.0 * float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def _map_batches(model, dataset, verbose=0, check=None):
    """Outputs and labels of every `(images, labels)` batch; `check`: the image size the first batch
    must have (and the rest of the input contract, `inputs.check_images`)."""
    outputs, labels = [], []
    progress = progress_bar(dataset, verbose)
    for images, batch_labels in dataset:
        if check is not None and not outputs:
            inputs.check_images(images, "extract_features", image_size=check)
        outputs.append(np.asarray(model.predict_on_batch(np.asarray(images))))
        labels.append(np.asarray(batch_labels))
        if progress:
            progress.add(1)
    if not outputs:
        raise ValueError("The data set to evaluate is empty.")
    return np.concatenate(outputs), np.concatenate(labels).astype("int64")


@dataclasses.dataclass
class EvaluationData:
    """The two splits of a data source as loaded for evaluation (see `load_evaluation_data`)."""

    train: object  # data.Split
    test: object  # data.Split
    class_names: list

    @property
    def num_classes(self):
        return len(self.class_names)

    def datasets(self, image_size, batch_size):
        """Both splits as un-augmented `(images, labels)` batches of `image_size`, in order."""
        from keras_mfm import data

        return [data.evaluation_dataset(split, image_size, batch_size, cache=False)
                for split in (self.train, self.test)]


def load_evaluation_data(source, train_images=None, test_images=None, seed=0):
    """Both splits of `source` (spec string or `DataSource`), optionally seeded subsets.

    Checks what every protocol needs: a test split and the same classes in both splits (at
    least 2). Images are resized to the encoder's size when batched (`EvaluationData.datasets`).
    """
    from keras_mfm import data

    if isinstance(source, str):
        source = data.resolve_data(source)
    train = data.load_split(source, "train", limit=train_images, seed=seed)
    test = data.load_split(source, "test", limit=test_images, seed=seed)
    if train.class_names and test.class_names and list(train.class_names) != list(test.class_names):
        raise data.DataError(
            f"The train and test splits have different classes: {train.class_names} vs {test.class_names}."
        )
    class_names = list(train.class_names or test.class_names)
    if len(class_names) == 1:
        raise data.DataError("The data has a single class; classification needs at least 2.")
    return EvaluationData(train, test, class_names)
