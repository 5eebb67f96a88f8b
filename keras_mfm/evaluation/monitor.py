"""k-NN top-1 of the encoder during pre-training, as a Keras callback.

    monitor = KNNMonitor(bank, held_out, every=5)   # (images, labels) batches, images in [0, 1]
    model.fit(..., callbacks=[monitor])             # logs["knn_top1"] every 5 epochs

Every `every` epochs the callback extracts features of the bank and of the held-out images with
the model's encoder (`model.encoder`, or the model itself when it is an encoder) and scores the
held-out images by weighted k-NN on the bank (`evaluate_knn`: k = 20, T = 0.07). In the epochs in
between `knn_top1` is NaN, so that `CSVLogger` and TensorBoard see the same column in every row.
"""

import math
import time

import keras

from keras_mfm.evaluation.knn import evaluate_knn


class KNNMonitor(keras.callbacks.Callback):
    """Adds `knn_top1` (%) and `knn_seconds` to the epoch logs every `every` epochs.

    Args:
        bank: `(images, labels)` batches (a list, a `tf.data.Dataset`, or a callable returning
            either) whose features are the k-NN memory bank.
        held_out: `(images, labels)` batches scored against the bank.
        every: epochs between scores (epoch numbers `every - 1`, `2 * every - 1`, ... from 0).
        k, temperature, pooling: of `evaluate_knn`.
    """

    def __init__(self, bank, held_out, every=1, k=20, temperature=0.07, pooling=None, verbose=0):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"KNNMonitor: `every` must be >= 1 epoch, got {every}.")
        self.bank, self.held_out = bank, held_out
        self.every, self.k, self.temperature, self.pooling = int(every), k, temperature, pooling
        self.verbose = verbose
        self.history = []  # (epoch, knn_top1)

    def encoder(self):
        return getattr(self.model, "encoder", self.model)

    def score(self):
        """k-NN top-1 (%) of the current encoder."""
        bank = self.bank() if callable(self.bank) else self.bank
        held_out = self.held_out() if callable(self.held_out) else self.held_out
        result = evaluate_knn(self.encoder(), bank, held_out, k=self.k, temperature=self.temperature,
                              pooling=self.pooling, verbose=self.verbose)
        return float(result["knn_top1"])

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if (epoch + 1) % self.every:
            logs["knn_top1"], logs["knn_seconds"] = math.nan, math.nan
            return
        start = time.perf_counter()
        logs["knn_top1"] = self.score()
        logs["knn_seconds"] = time.perf_counter() - start
        self.history.append((epoch, logs["knn_top1"]))
        if self.verbose:
            print(f"epoch {epoch}: k-NN top-1 {logs['knn_top1']:.2f} % ({logs['knn_seconds']:.0f} s)")
