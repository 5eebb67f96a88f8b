"""FAMT/AMT's importance table and its periodic refresh (SPEC.md section 2, "Schedule").

One importance map per training image, scored by the current encoder in inference mode on the
un-augmented image (resized to the training size, all tokens), from the last block's attention
(AMT) or attention and patch-token features (FAMT). The table lives in the pre-training model
(`MAE.importance_table`, saved with its checkpoints); `ImportanceRefresh` refills it at the start
of epoch `warmup_epochs` and every `interval` epochs after. Before the first refresh the model
trains as plain MAE (random masking 0.75).
"""

import time

import keras
import numpy as np

from keras_mfm.masking import amt_importance, check_weights, famt_importance
from keras_mfm.inputs import progress_bar

IMPORTANCE_METHODS = ("amt", "famt")


@keras.saving.register_keras_serializable(package="keras_mfm")
class ImportanceScorer(keras.Model):
    """`images (B, H, W, 3) in [0, 1] -> importance (B, N)` of a ViT encoder, inference mode."""

    def __init__(self, encoder, method="famt", cutoff=0.15, **kwargs):
        super().__init__(**kwargs)
        if method not in IMPORTANCE_METHODS:
            raise ValueError(f"Unknown importance method {method!r}; choose one of {IMPORTANCE_METHODS}.")
        self.encoder = encoder
        self.method = method
        self.cutoff = float(cutoff)

    def call(self, images):
        tokens, attention = self.encoder.encode(images, return_attention=True, training=False)
        if self.method == "amt":
            return amt_importance(attention)
        return famt_importance(attention, keras.ops.cast(tokens[:, 1:], "float32"), self.cutoff)


def score_images(encoder, dataset, num_images, method="famt", cutoff=0.15, verbose=0, scorer=None):
    """The importance table `(num_images, N)` float32 from `(images, index)` batches.

    Rows of images that are not in `dataset` stay 1 (uniform). `scorer`: an `ImportanceScorer` of
    `encoder` to reuse (its compiled predict function survives between refreshes).
    """
    scorer = scorer or ImportanceScorer(encoder, method, cutoff)
    table = np.ones((num_images, encoder.num_patches), "float32")
    progress = progress_bar(dataset, verbose)
    seen = 0
    for images, index in dataset:
        index = np.asarray(index)
        if index.size and (index.min() < 0 or index.max() >= num_images):
            raise ValueError(f"Image index {int(index.max())} is outside the importance table ({num_images} rows).")
        table[index] = np.asarray(scorer.predict_on_batch(np.asarray(images)))
        seen += len(index)
        if progress:
            progress.add(1)
    if seen == 0:
        raise ValueError("No images to score the importance on.")
    check_weights(table)
    return table


class ImportanceRefresh(keras.callbacks.Callback):
    """Refills the model's importance table at the start of epoch `warmup_epochs`, then every
    `interval` epochs (epochs counted from 0), and switches the model to importance masking.

    Args:
        dataset_fn: a function returning a fresh `(images, index)` batch iterable of the
            un-augmented training images (e.g. `lambda: data.indexed_dataset(split, size, 256)`).
        warmup_epochs: epochs of plain MAE before the first refresh (>= 1).
        interval: epochs between refreshes (>= 1).
        done_epoch: an epoch whose refresh already happened (a run resumed inside that epoch,
            whose checkpoint holds the table scored at its start).
    """

    def __init__(self, dataset_fn, warmup_epochs, interval, verbose=0, done_epoch=None):
        super().__init__()
        if warmup_epochs < 1:
            raise ValueError(
                f"The first importance refresh needs at least one warm-up epoch (the encoder must have "
                f"trained), got warmup_epochs={warmup_epochs}."
            )
        if interval < 1:
            raise ValueError(f"The refresh interval must be >= 1 epoch, got {interval}.")
        self.dataset_fn = dataset_fn
        self.warmup_epochs = int(warmup_epochs)
        self.interval = int(interval)
        self.verbose = verbose
        self.done_epoch = done_epoch
        self.history = []  # (epoch, seconds) of each refresh

    def due(self, epoch):
        if epoch == self.done_epoch:
            return False
        return epoch >= self.warmup_epochs and (epoch - self.warmup_epochs) % self.interval == 0

    def on_train_begin(self, logs=None):
        self.model.sync_importance_phase()

    def on_epoch_begin(self, epoch, logs=None):
        if not self.due(epoch):
            return
        start = time.perf_counter()
        model = self.model
        if getattr(self, "_scorer", None) is None or self._scorer.encoder is not model.encoder:
            self._scorer = ImportanceScorer(model.encoder, model.importance, model.cutoff)
        table = score_images(model.encoder, self.dataset_fn(), model.num_images, model.importance,
                             model.cutoff, verbose=self.verbose, scorer=self._scorer)
        switching = not model.importance_ready
        model.set_importance(table)
        if switching:  # random -> importance masking changes the step's shapes: compile the new phase
            model.make_train_function(force=True)
        self.history.append((epoch, time.perf_counter() - start))
        if self.verbose:
            print(f"importance refreshed at epoch {epoch} in {self.history[-1][1]:.1f} s")
