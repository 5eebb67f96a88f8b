"""FAMT/AMT's importance table and its periodic refresh (SPEC.md section 2, "Schedule").

One importance map per training image, scored by the current encoder in inference mode on the
un-augmented image (resized to the training size, all tokens), from the last block's attention
(AMT) or attention and patch-token features (FAMT). The table belongs to the pre-training model,
compact by default (`encode_table`), saved with its checkpoints: a non-trainable variable
(`MAE.importance_table`), or a `HostTable` in host memory whose rows the input pipeline adds to each
batch (`importance_location="host"`, what `train.py` uses: nothing replicated on the devices);
`ImportanceRefresh` refills it at the start of epoch `warmup_epochs` and every `interval` epochs
after, each data-parallel device scoring its share (`distribution.SharedInference`). Before the
first refresh the model trains as plain MAE (random masking 0.75).
"""

import time
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_mfm.distribution import SharedInference
from keras_mfm.masking import amt_importance, check_weights, famt_importance
from keras_mfm.inputs import progress_bar

IMPORTANCE_METHODS = ("amt", "famt")

# -- how the table is stored ---------------------------------------------------------------------
#: `TokenMaskingModel(importance_storage=...)`: bytes per patch 4, 2 or 1 (+ 4 per image for "uint8").
IMPORTANCE_STORAGES = ("float32", "float16", "uint8")
DEFAULT_IMPORTANCE_STORAGE = "uint8"
#: The draw floors positive weights at this fraction of their row's maximum (`masking.draw_order`).
_LOWEST_RELATIVE = 1e-37
_TOP_CODE = 255  # uint8: the row's largest weight; 0 = a zero weight
_FLOAT16_TINY = float(np.finfo(np.float16).tiny)  # smallest normal float16, 6.1e-5
_CHUNK_ROWS = 65536


def check_storage(storage):
    if storage not in IMPORTANCE_STORAGES:
        raise ValueError(f"Unknown importance_storage {storage!r}; choose one of {IMPORTANCE_STORAGES}.")
    return storage


def table_bytes(num_images, num_patches, storage):
    """Bytes of an importance table of `num_images` maps of `num_patches` values."""
    per_patch = {"float32": 4, "float16": 2, "uint8": 1}[check_storage(storage)]
    return num_images * num_patches * per_patch + (num_images * 4 if storage == "uint8" else 0)


#: Where a model keeps its table: "model" (a non-trainable variable, saved in `.keras` files; `fit` on
#: arrays works) or "host" (a `HostTable` in host memory, or memory-mapped files, that the input
#: pipeline reads by image index: `data.with_importance`; nothing replicated on the devices).
IMPORTANCE_LOCATIONS = ("model", "host")
DEFAULT_IMPORTANCE_LOCATION = "model"
#: What `train.py` uses (its pipeline attaches each batch's rows when the table is on the host; its
#: checkpoints hold the table either way, the host one in the `.keras` file's assets).
TRAINING_IMPORTANCE_LOCATION = "host"
HOST_TABLE_FILES = ("values.npy", "steps.npy")


def check_location(location):
    if location not in IMPORTANCE_LOCATIONS:
        raise ValueError(f"Unknown importance_location {location!r}; choose one of {IMPORTANCE_LOCATIONS}.")
    return location


class StoredTable(NamedTuple):
    """A table in its stored form (`encode_table`): `values (images, N)` in the storage's dtype and
    `steps (images,)` float32 for "uint8" (else None). `score_images` fills one batch by batch, so a
    refresh never holds the float32 table; `set_importance` takes it as it is."""

    values: np.ndarray
    steps: object = None


def encode_table(table, storage):
    """A float32 table `(images, N)` as stored: `(values, steps)`, `steps` None unless "uint8".

    Only the order of the draw matters, and `masking.draw_order` divides each row by its maximum,
    so rows are stored relative to their maximum (a row's scale is not kept; rows of zeros stay
    zeros, i.e. uniform):

    - "float32": the table unchanged.
    - "float16": `w / max(w)`, positive values at least float16's smallest normal (6.1e-5), so a
      positive weight stays positive (relative error <= 2**-11).
    - "uint8": a logarithmic code per patch and one float32 step per image:
      `code = 255 + round(log(w / max(w)) / step)` (at least 1) for `w > 0`, 0 for `w = 0`, with
      `step = log(max(w) / min(w)) / 254` over the row's positive weights (their ratio capped at
      1e37, as the draw floors them). Decoding gives `exp((code - 255) * step)`; the error of each
      draw key `log w + Gumbel noise` is at most `step / 2` (e.g. 0.009 for weights spanning a
      factor 100).
    """
    table = np.asarray(table, dtype="float32")
    storage = check_storage(storage)
    if storage == "float32":
        return table, None
    if len(table) > _CHUNK_ROWS:  # in slices of rows: the temporaries stay small for a large table
        values = np.empty(table.shape, storage)
        steps = np.empty(len(table), "float32") if storage == "uint8" else None
        for start in range(0, len(table), _CHUNK_ROWS):
            part, part_steps = encode_table(table[start:start + _CHUNK_ROWS], storage)
            values[start:start + len(part)] = part
            if steps is not None:
                steps[start:start + len(part)] = part_steps
        return values, steps
    row_max = table.max(axis=1, keepdims=True)
    scale = np.where(row_max > 0, row_max, 1.0)
    relative = table / scale
    if storage == "float16":
        return np.where(relative > 0, np.maximum(relative, _FLOAT16_TINY), 0.0).astype("float16"), None
    positive = relative > 0
    with np.errstate(divide="ignore"):
        logs = np.where(positive, np.log(np.maximum(relative, _LOWEST_RELATIVE)), 0.0)  # <= 0
    spread = -logs.min(axis=1)  # log(max / min) over the positive weights (0 for a row without them)
    steps = (spread / (_TOP_CODE - 1)).astype("float32")
    safe = np.where(steps > 0, steps, 1.0)[:, None]
    codes = np.clip(_TOP_CODE + np.rint(logs / safe), 1, _TOP_CODE)
    codes = np.where(positive, codes, 0)
    codes[row_max[:, 0] <= 0] = _TOP_CODE  # an all-zero row: uniform, as the draw treats it
    return codes.astype("uint8"), steps


def uniform_table(num_images, num_patches, storage):
    """A `StoredTable` of `num_images` uniform maps (every weight equal) in `storage`: an unscored table."""
    values, steps = encode_table(np.ones((1, num_patches), "float32"), storage)
    return StoredTable(np.repeat(values, num_images, axis=0), None if steps is None else np.repeat(steps, num_images))


class HostTable:
    """An importance table kept in host memory for the input pipeline (`importance_location="host"`).

    `values (num_images, N)` in the storage's dtype and, for "uint8", `steps (num_images,)` float32,
    as `encode_table` writes them; all rows start uniform. `data.with_importance` adds each batch's
    rows to its inputs (`importance_values`, `importance_steps`), so a device only ever holds the
    rows of its share of the batch. `version` counts the refreshes. `write_into` writes the two
    arrays as `.npy` files into a folder (the model's `.keras` assets); `load` reads them back,
    memory-mapped unless `mmap=False`.
    """

    def __init__(self, num_images, num_patches, storage=DEFAULT_IMPORTANCE_STORAGE):
        self.storage = check_storage(storage)
        self.values, self.steps = uniform_table(num_images, num_patches, self.storage)
        self.version = 0

    @property
    def shape(self):
        return self.values.shape

    def set(self, values, steps=None):
        """Replace the table by a stored one (`encode_table`'s arrays) and count a refresh."""
        if tuple(np.shape(values)) != self.values.shape or str(values.dtype) != self.storage \
                or (steps is None) != (self.steps is None):
            raise ValueError(f"A {self.storage} table of shape {self.values.shape} was expected, got "
                             f"{values.dtype} {tuple(np.shape(values))}.")
        self.values, self.steps = values, steps
        self.version += 1

    def rows(self, index):
        """`(values, steps)` of the images `index` (B,); `steps` zeros unless "uint8" (unused then)."""
        index = np.asarray(index, "int64")
        if index.size and (index.min() < 0 or index.max() >= len(self.values)):
            raise ValueError(f"Image index {int(index.max())} is outside the importance table "
                             f"({len(self.values)} rows): the pipeline is not the one the table was made for.")
        steps = np.zeros(len(index), "float32") if self.steps is None else np.asarray(self.steps[index])
        return np.asarray(self.values[index]), steps

    def write_into(self, folder):
        """The arrays as `.npy` files in the existing `folder` (e.g. a `.keras` file's assets)."""
        import os

        np.save(os.path.join(folder, HOST_TABLE_FILES[0]), np.asarray(self.values))
        if self.steps is not None:
            np.save(os.path.join(folder, HOST_TABLE_FILES[1]), np.asarray(self.steps))

    def load(self, folder, version, mmap=True):
        """Read a table `write_into` wrote (memory-mapped read-only, or with `mmap=False` into memory)
        and set its refresh `version`."""
        import os

        mode = "r" if mmap else None
        try:
            values = np.load(os.path.join(folder, HOST_TABLE_FILES[0]), mmap_mode=mode)
            steps = np.load(os.path.join(folder, HOST_TABLE_FILES[1]), mmap_mode=mode) if self.steps is not None \
                else None
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read the importance table in {folder}: {error}.") from None
        self.set(values, steps)
        self.version = int(version)


def decode_rows(values, steps=None):
    """Stored rows (`encode_table`) back to float32 weights, `keras.ops` (usable inside a step)."""
    if steps is None:
        return ops.cast(values, "float32")
    codes = ops.cast(values, "float32")
    weights = ops.exp((codes - float(_TOP_CODE)) * ops.cast(steps, "float32")[:, None])
    return ops.where(codes > 0.0, weights, 0.0)


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


def score_images(encoder, dataset, num_images, method="famt", cutoff=0.15, verbose=0, scorer=None, shared=None,
                 storage="float32"):
    """The importance table `(num_images, N)` from `(images, index)` batches.

    Rows of images that are not in `dataset` stay 1 (uniform). `scorer`: an `ImportanceScorer` of
    `encoder` to reuse (its compiled predict function survives between refreshes). `shared`: a
    `distribution.SharedInference` of the scorer, so that each data-parallel device scores only its
    share of every batch (default: the scorer's `predict_on_batch`, one device). `storage`:
    "float32" returns the float32 array; "float16" or "uint8" encode each batch's rows as they come
    (`encode_table` works row by row, so the result is the same) and return a `StoredTable`, so
    that no float32 table of every image is ever held (1.0 GB for ImageNet-1K at 196 patches).
    """
    storage = check_storage(storage)
    scorer = scorer or ImportanceScorer(encoder, method, cutoff)
    predict = shared or scorer.predict_on_batch
    values, steps = uniform_table(num_images, encoder.num_patches, storage)
    progress = progress_bar(dataset, verbose)
    seen = 0
    for images, index in dataset:
        index = np.asarray(index)
        if index.size and (index.min() < 0 or index.max() >= num_images):
            raise ValueError(f"Image index {int(index.max())} is outside the importance table ({num_images} rows).")
        scores = check_weights(np.asarray(predict(np.asarray(images)), "float32"))
        scores, score_steps = encode_table(scores, storage)
        values[index] = scores
        if steps is not None:
            steps[index] = score_steps
        seen += len(index)
        if progress:
            progress.add(1)
    if seen == 0:
        raise ValueError("No images to score the importance on.")
    return values if storage == "float32" else StoredTable(values, steps)


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
            # data-parallel: each device scores its share of every batch (one device: predict_on_batch)
            self.shared = SharedInference(self._scorer, strategy_of=model)
        table = score_images(model.encoder, self.dataset_fn(), model.num_images, model.importance,
                             model.cutoff, verbose=self.verbose, scorer=self._scorer, shared=self.shared,
                             storage=model.importance_storage)
        switching = not model.importance_ready
        model.set_importance(table)
        if switching:  # random -> importance masking changes the step's shapes: compile the new phase
            model.make_train_function(force=True)
        self.history.append((epoch, time.perf_counter() - start))
        if self.verbose:
            print(f"importance refreshed at epoch {epoch} in {self.history[-1][1]:.1f} s")
