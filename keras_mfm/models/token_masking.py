"""What the token-masking pre-training models (MAE, SimMIM) share: the mask/throw draw and FAMT's
importance table (SPEC.md section 2).

    w (B, N)    token weights: ones (random masking) or per-image importance (AMT/FAMT)
    selection   `masking.select_tokens(w, mask_ratio, throw_ratio)`: masked, thrown, visible

With `importance` set ("amt" or "famt") the model keeps one importance map per training image in a
non-trainable `(num_images, N)` variable (saved in its checkpoints), which
`keras_mfm.importance.ImportanceRefresh` refills; until the first refresh the model masks at random
(`warmup_mask_ratio`, nothing thrown), as the authors' plain-MAE warm-up. The table is stored
compactly by default (`importance_storage="uint8"`: one logarithmic byte per patch and a float32 step
per image, `importance.encode_table`), or as float16 or float32. With `importance_location="host"`
the table is an `importance.HostTable` in host memory instead of a variable: the input pipeline
(`data.with_importance`) adds each batch's stored rows to the inputs, so no device holds more than
its batch's rows and nothing of it is replicated; it is saved with the model all the same (the
`.keras` file's assets), so checkpoints resume exactly.
"""

import collections

import keras
import numpy as np
from keras import ops

from keras_mfm.backend import ReplicaSeedGenerator, scale_loss_for_replicas
from keras_mfm.importance import (
    DEFAULT_IMPORTANCE_LOCATION,
    DEFAULT_IMPORTANCE_STORAGE,
    IMPORTANCE_METHODS,
    HostTable,
    ImportanceScorer,
    StoredTable,
    check_location,
    check_storage,
    decode_rows,
    encode_table,
)
from keras_mfm.masking import MASKED, VISIBLE, check_weights, follow_augmentation, select_tokens, token_counts
from keras_mfm.models.base import PretrainingModel

TokenMasking = collections.namedtuple("TokenMasking", ["labels", "masked", "token_indices", "patch_mask"])
TokenMasking.__doc__ = """The masking of a batch, one record for MAE and SimMIM (int32 unless noted).

`labels` `(B, N)`: `masking.VISIBLE`, `MASKED` or `THROWN` per patch (row-major); `masked` `(B, M)`:
the masked patches, in the order the model predicts them; `token_indices` `(B, K)`: the patches the
encoder sees (MAE: the visible ones; SimMIM with FAMT: visible then masked), or None: every patch
(SimMIM's random masking); `patch_mask` `(B, N)` float32: 1 where a patch is masked.
"""


def masking_of_selection(selection, encoder_sees_masked=False):
    """The `TokenMasking` of a `masking.TokenSelection`: the encoder sees the visible patches (MAE)
    or, with `encoder_sees_masked`, the visible then the masked ones (SimMIM's mask tokens)."""
    tokens = ops.concatenate([selection.visible, selection.masked], axis=1) if encoder_sees_masked \
        else selection.visible
    patch_mask = ops.cast(ops.equal(selection.labels, MASKED), "float32")
    return TokenMasking(selection.labels, selection.masked, tokens, patch_mask)


def masking_of_patch_mask(patch_mask, masked):
    """The `TokenMasking` of a `(B, N)` 0/1 patch mask whose patches all go to the encoder."""
    labels = ops.where(patch_mask > 0.5, MASKED, VISIBLE)
    return TokenMasking(ops.cast(labels, "int32"), masked, None, ops.cast(patch_mask, "float32"))


def whole_image_inputs(images, index=None):
    """AMT/FAMT inputs for images used as they are (no crop, no flip): `data.with_index(images)`,
    with `index` (B,) instead of 0..B-1 if given; each image's stored map is then used unchanged."""
    from keras_mfm.data import with_index  # NumPy only: no TensorFlow import

    inputs = with_index(images)
    if index is not None:
        inputs["index"] = np.asarray(index)
    return inputs


class TokenMaskingModel(PretrainingModel):
    """Base of MAE and SimMIM: a ViT encoder, mask/throw ratios and an optional importance table.

    Inputs: images `(B, H, W, 3)` in [0, 1], or `{"images": ..., "importance": (B, N)}` to draw the
    masked/thrown patches by the given importance, or (AMT/FAMT, `importance` set)
    `{"images", "index", "box", "flip"}` (`data.pretraining_dataset(with_geometry=True)`): each
    image's stored map is cropped and flipped like the image and drives the draw once the table has
    been filled. A model keeping its table on the host (`importance_location="host"`) takes the
    stored rows with the inputs instead: `{"images", "index", "box", "flip", "importance_values"
    (B, N) in the storage's dtype, "importance_steps" (B,) float32}` (`data.with_importance`).

    Args:
        encoder: a `keras_mfm.backbones.ViTBackbone`.
        mask_ratio, throw_ratio: shares of masked and thrown patches (`masking.token_counts`).
        seed: seed of the token draws.
        importance: None (random masking), "amt" or "famt": keep an importance table.
        num_images: rows of the importance table (the training split's size).
        warmup_mask_ratio: random masking before the table is filled.
        cutoff: FAMT's low-pass cut-off (0.15 of N).
        importance_storage: how the table is kept: "uint8" (default; 1 byte per patch + 4 per
            image), "float16" or "float32" (see `importance.encode_table`).
        importance_location: where the table is kept: "model" (default; a non-trainable variable,
            so that `fit` on arrays works) or "host" (an `importance.HostTable`, read by the input
            pipeline; for large data sets and several devices).
    """

    def __init__(self, encoder, mask_ratio, throw_ratio=0.0, seed=None, importance=None, num_images=None,
                 warmup_mask_ratio=0.75, cutoff=0.15, importance_storage=DEFAULT_IMPORTANCE_STORAGE,
                 importance_location=DEFAULT_IMPORTANCE_LOCATION, **kwargs):
        super().__init__(**kwargs)
        if not hasattr(encoder, "patch_size"):
            raise ValueError(f"{type(self).__name__} needs a ViT encoder (patch tokens), got {type(encoder).__name__}.")
        self.encoder = encoder
        self.mask_ratio = float(mask_ratio)
        self.throw_ratio = float(throw_ratio)
        # AMT/FAMT count their tokens with AMT's rule, plain random masking with MAE's (the authors')
        self.count_rule = "amt" if importance or self.throw_ratio else "mae"
        self.counts = token_counts(encoder.num_patches, self.mask_ratio, self.throw_ratio, self.count_rule)
        if self.counts[0] < 1:
            raise ValueError(
                f"{type(self).__name__} needs at least one masked patch to reconstruct; mask_ratio={mask_ratio}."
            )
        self.seed = seed
        self.seed_generator = ReplicaSeedGenerator(seed)  # distinct draws per tf.distribute replica
        if importance not in (None,) + IMPORTANCE_METHODS:
            raise ValueError(f"Unknown importance {importance!r}; choose None (random masking), 'amt' or 'famt'.")
        if importance and (num_images is None or int(num_images) < 1):
            raise ValueError("An importance table needs `num_images` (the number of training images).")
        self.importance = importance
        self.num_images = int(num_images) if importance else None
        self.warmup_mask_ratio = float(warmup_mask_ratio)
        token_counts(encoder.num_patches, self.warmup_mask_ratio, 0.0, "mae")  # validates the warm-up ratio
        self.cutoff = float(cutoff)
        self.importance_storage = check_storage(importance_storage)
        self.importance_location = check_location(importance_location)
        self.host_table = None
        self.importance_ready = False  # Python-level phase: shapes differ before/after the first refresh

    def build_importance(self):
        """Creates the importance table and the refresh counter (called from `build`)."""
        if self.importance and self.importance_location == "host":
            self.importance_table = self.importance_step = None
            self.host_table = HostTable(self.num_images, self.encoder.num_patches, self.importance_storage)
        elif self.importance:
            uint8 = self.importance_storage == "uint8"
            self.importance_table = self.add_weight(  # all ones (uint8: the top code): uniform
                shape=(self.num_images, self.encoder.num_patches), trainable=False, name="importance_table",
                initializer=keras.initializers.Constant(255) if uint8 else "ones", dtype=self.importance_storage,
            )
            self.importance_step = None
            if uint8:
                self.importance_step = self.add_weight(shape=(self.num_images,), initializer="zeros",
                                                       trainable=False, name="importance_step")
        if self.importance:
            self.refresh_count = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                                 name="refresh_count")

    # -- importance (AMT/FAMT) ---------------------------------------------------------------
    def set_importance(self, table):
        """Store a freshly scored table `(num_images, N)` and switch to importance masking: float
        weights, or a `StoredTable` already in this model's storage (`score_images(storage=...)`)."""
        if isinstance(table, StoredTable):
            values, steps = table
            self.check_table_shape(np.shape(values))
            if str(values.dtype) != self.importance_storage or (steps is None) != (self.importance_storage != "uint8"):
                raise ValueError(
                    f"The stored table is {values.dtype} but this model stores its importance as "
                    f"{self.importance_storage!r}: score it with storage={self.importance_storage!r}."
                )
        else:
            table = np.asarray(ops.convert_to_numpy(table) if not isinstance(table, np.ndarray) else table)
            self.check_table_shape(table.shape)
            check_weights(table)
            values, steps = encode_table(table, self.importance_storage)
        if self.host_table is not None:
            self.host_table.set(values, steps)
        else:
            self.importance_table.assign(values)
            if steps is not None:
                self.importance_step.assign(steps)
        self.refresh_count.assign(self.refresh_count + 1.0)
        self.importance_ready = True

    def check_table_shape(self, shape, what="The importance table"):
        """A clear error unless `shape` is this model's `(num_images, num_patches)`."""
        expected = (self.num_images, self.encoder.num_patches)
        if tuple(int(d) for d in shape) != expected:
            got = f"{shape[0]} images x {shape[1]} patches" if len(shape) == 2 else f"shape {tuple(shape)}"
            raise ValueError(
                f"{what} holds {got}, but this {self.importance.upper()} model's table is for {expected[0]} images "
                f"x {expected[1]} patches (the training set's size and the encoder's patch grid)."
            )

    def check_num_images(self, num_images):
        """A clear error unless the training set has the table's number of images (e.g. a resumed run)."""
        if self.importance and int(num_images) != self.num_images:
            raise ValueError(
                f"This {self.importance.upper()} model's importance table is for {self.num_images} training images, "
                f"but the data set has {int(num_images)}: one map per image, so the run needs the same training set."
            )

    def importance_maps(self, index=None):
        """The stored maps as float32 `(len(index) or num_images, N)`, each relative to its maximum
        with compact storage (the draw uses only the order); float32 storage gives the table as set."""
        if self.host_table is not None:
            table = self.host_table
            values, steps = (table.values, table.steps) if index is None else table.rows(ops.convert_to_numpy(index))
            return decode_rows(np.asarray(values), None if table.steps is None else np.asarray(steps))
        values, steps = self.importance_table, self.importance_step
        if index is not None:
            index = ops.cast(index, "int32")
            values = ops.take(values, index, axis=0)
            steps = None if steps is None else ops.take(steps, index, axis=0)
        return decode_rows(values, steps)

    def sync_importance_phase(self):
        """Importance masking iff the table has been filled (e.g. after loading a checkpoint)."""
        if self.importance:
            self.importance_ready = float(ops.convert_to_numpy(self.refresh_count)) > 0

    def augmented_importance(self, index, box, flip, maps=None):
        """Each image's stored map (or `maps` (B, N), decoded rows of the host table), cropped and
        flipped like the image, on the patch grid: `(B, N)`."""
        rows, cols = self.encoder.grid_size
        maps = ops.reshape(self.importance_maps(index) if maps is None else maps, (-1, rows, cols))
        return follow_augmentation(maps, box, flip, (rows, cols))

    def split_inputs(self, inputs):
        """`(images, importance or None)` of the model's inputs (see the class docstring)."""
        if not isinstance(inputs, dict):
            return inputs, None
        importance = inputs.get("importance")
        if importance is None and self.importance and self.importance_ready and "index" in inputs:
            if self.host_table is not None:
                if "importance_values" not in inputs:
                    raise ValueError(self._host_rows_missing(type(self).__name__))
                steps = inputs["importance_steps"] if self.importance_storage == "uint8" else None
                maps = decode_rows(inputs["importance_values"], steps)
            else:
                maps = None
            importance = self.augmented_importance(inputs["index"], inputs["box"], inputs["flip"], maps)
        return inputs["images"], importance

    def select(self, images, importance=None):
        """The token draw of a batch: `TokenSelection` (visible, masked, thrown, labels).

        Without `importance`: random masking, at `warmup_mask_ratio` without throwing for an
        AMT/FAMT model whose table is not filled yet, else at `mask_ratio`/`throw_ratio`.
        """
        mask_ratio, throw_ratio, rule = self.mask_ratio, self.throw_ratio, self.count_rule
        if importance is None:
            importance = ops.ones((ops.shape(images)[0], self.encoder.num_patches), "float32")
            if self.importance and not self.importance_ready:
                mask_ratio, throw_ratio, rule = self.warmup_mask_ratio, 0.0, "mae"
        return select_tokens(importance, mask_ratio, throw_ratio, seed=self.seed_generator, validate=False, rule=rule)

    def draw(self, images, importance=None):
        """The `TokenMasking` of a batch (`select` by default, the encoder seeing the visible patches)."""
        return masking_of_selection(self.select(images, importance))

    def predict_masked(self, images, masking, training=None):
        """Predicted (normalised) pixels `(B, M, p*p*3)` of the masked patches of a `TokenMasking`."""
        raise NotImplementedError

    def call(self, inputs, training=None):
        images, importance = self.split_inputs(inputs)
        masking = self.draw(images, importance)
        return self.predict_masked(images, masking, training=training), masking.masked

    def prediction_pixels(self, images, prediction, masked):
        """`prediction` `(B, M, p*p*3)` (what the loss compares) as pixels in [0, 1] space (not clipped)."""
        batch, count = ops.shape(prediction)[0], ops.shape(prediction)[1]
        pixels = ops.reshape(ops.cast(prediction, "float32"), (batch, count, -1, 3))
        pixels = pixels * ops.convert_to_tensor(self.encoder.std, "float32") + ops.convert_to_tensor(
            self.encoder.mean, "float32")
        return ops.reshape(pixels, (batch, count, -1))

    def reconstruct(self, images, importance=None):
        """What the model makes of `images` `(B, H, W, 3)` in [0, 1] (one draw, inference), for figures:

        `{"importance": (B, N) or None, "labels": (B, N), "masked": (B, M), "prediction":
        (B, M, p*p*3)}`, the prediction in pixel space (`patchify` layout, not clipped). `importance`:
        the weights of the draw; None for an AMT/FAMT model: scored on these images
        (`importance.ImportanceScorer`), so that the masks follow them.
        """
        if importance is None and self.importance:
            importance = ImportanceScorer(self.encoder, self.importance, self.cutoff)(images)
        if importance is not None:
            importance = ops.convert_to_tensor(importance, "float32")
            expected = (int(ops.shape(images)[0]), self.encoder.num_patches)
            if tuple(ops.shape(importance)) != expected:
                raise ValueError(f"Expected an importance map of shape {expected} (images, patches), got "
                                 f"{tuple(ops.shape(importance))}.")
        masking = self.draw(images, importance)
        prediction = self.predict_masked(images, masking, training=False)
        return {"importance": importance, "labels": masking.labels, "masked": masking.masked,
                "prediction": self.prediction_pixels(images, prediction, masking.masked)}

    def check_batch(self, batch, where):
        """Also: an AMT/FAMT model needs each image's index (and crop box and flip) to look up its
        importance map; without them it would mask at random after the refresh, silently."""
        super().check_batch(batch, where)
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not self.importance or (isinstance(x, dict) and "importance" in x):
            return
        missing = [key for key in ("index", "box", "flip") if not (isinstance(x, dict) and key in x)]
        if not missing and self.host_table is not None and "importance_values" not in x:
            raise ValueError(self._host_rows_missing(where))
        if missing:
            raise ValueError(
                f"{where}: {self.importance.upper()} looks up each image's importance map by its index, but the "
                f"inputs have no {', '.join(repr(k) for k in missing)}; pass "
                "`keras_mfm.data.with_index(images)` (or a dict with 'importance' maps)."
            )

    def _host_rows_missing(self, where):
        return (f"{where}: this {self.importance.upper()} model keeps its importance table on the host "
                "(importance_location='host'), but the inputs have no 'importance_values': pass the batches "
                "through `keras_mfm.data.with_importance(dataset, model)`, or build the model with "
                "importance_location='model'.")

    # -- the host table travels in the .keras file's assets -----------------------------------
    def save_assets(self, dir_path):
        if self.host_table is not None:
            self.host_table.write_into(dir_path)

    def load_assets(self, dir_path):
        if self.host_table is not None:
            self.host_table.load(dir_path, version=float(ops.convert_to_numpy(self.refresh_count)), mmap=False)

    # -- loss ----------------------------------------------------------------------------------
    def reconstruction_loss(self, images, prediction, masked):
        """The method's loss on the masked patches `masked` `(B, M)` of `prediction` `(B, M, p*p*3)`."""
        raise NotImplementedError

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """`reconstruction_loss` of the call's `(prediction, masked)` (+ any layer losses); all three
        `model.fit` trainers call it."""
        images = x["images"] if isinstance(x, dict) else x  # not split_inputs: no second importance map
        prediction, masked = y_pred
        loss = self.reconstruction_loss(images, prediction, masked)
        if self.losses:
            loss = loss + ops.cast(ops.sum(self.losses), "float32")
        return scale_loss_for_replicas(loss)

    def get_config(self):
        config = super().get_config()
        config.update({
            "mask_ratio": self.mask_ratio,
            "throw_ratio": self.throw_ratio,
            "seed": self.seed,
            "importance": self.importance,
            "num_images": self.num_images,
            "warmup_mask_ratio": self.warmup_mask_ratio,
            "cutoff": self.cutoff,
            "importance_storage": self.importance_storage,
            "importance_location": self.importance_location,
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("importance"):  # saved before the option existed: a float32 table
            config.setdefault("importance_storage", "float32")
        return super().from_config(config)
