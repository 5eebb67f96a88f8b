"""What the token-masking pre-training models (MAE, SimMIM) share: the mask/throw draw and FAMT's
importance table (SPEC.md section 2).

    w (B, N)    token weights: ones (random masking) or per-image importance (AMT/FAMT)
    selection   `masking.select_tokens(w, mask_ratio, throw_ratio)`: masked, thrown, visible

With `importance` set ("amt" or "famt") the model keeps one importance map per training image in a
non-trainable `(num_images, N)` variable (saved in its checkpoints), which
`keras_mfm.importance.ImportanceRefresh` refills; until the first refresh the model masks at random
(`warmup_mask_ratio`, nothing thrown), as the authors' plain-MAE warm-up.
"""

import keras
import numpy as np
from keras import ops

from keras_mfm.distribution import ReplicaSeedGenerator, scale_loss_for_replicas
from keras_mfm.importance import IMPORTANCE_METHODS
from keras_mfm.masking import check_weights, follow_augmentation, select_tokens, token_counts
from keras_mfm.models.base import PretrainingModel


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
    been filled.

    Args:
        encoder: a `keras_mfm.backbones.ViTBackbone`.
        mask_ratio, throw_ratio: shares of masked and thrown patches (`masking.token_counts`).
        seed: seed of the token draws.
        importance: None (random masking), "amt" or "famt": keep an importance table.
        num_images: rows of the importance table (the training split's size).
        warmup_mask_ratio: random masking before the table is filled.
        cutoff: FAMT's low-pass cut-off (0.15 of N).
    """

    def __init__(self, encoder, mask_ratio, throw_ratio=0.0, seed=None, importance=None, num_images=None,
                 warmup_mask_ratio=0.75, cutoff=0.15, **kwargs):
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
        self.importance_ready = False  # Python-level phase: shapes differ before/after the first refresh

    def build_importance(self):
        """Creates the importance table and the refresh counter (called from `build`)."""
        if self.importance:
            self.importance_table = self.add_weight(
                shape=(self.num_images, self.encoder.num_patches), initializer="ones", trainable=False,
                name="importance_table",
            )
            self.refresh_count = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                                 name="refresh_count")

    # -- importance (AMT/FAMT) ---------------------------------------------------------------
    def set_importance(self, table):
        """Store a freshly scored table `(num_images, N)` and switch to importance masking."""
        check_weights(table)
        self.importance_table.assign(ops.cast(table, "float32"))
        self.refresh_count.assign(self.refresh_count + 1.0)
        self.importance_ready = True

    def sync_importance_phase(self):
        """Importance masking iff the table has been filled (e.g. after loading a checkpoint)."""
        if self.importance:
            self.importance_ready = float(ops.convert_to_numpy(self.refresh_count)) > 0

    def augmented_importance(self, index, box, flip):
        """Each image's stored map, cropped/flipped like the image, on the patch grid: `(B, N)`."""
        rows, cols = self.encoder.grid_size
        maps = ops.take(self.importance_table, ops.cast(index, "int32"), axis=0)
        maps = ops.reshape(maps, (-1, rows, cols))
        return follow_augmentation(maps, box, flip, (rows, cols))

    def split_inputs(self, inputs):
        """`(images, importance or None)` of the model's inputs (see the class docstring)."""
        if not isinstance(inputs, dict):
            return inputs, None
        importance = inputs.get("importance")
        if importance is None and self.importance and self.importance_ready and "index" in inputs:
            importance = self.augmented_importance(inputs["index"], inputs["box"], inputs["flip"])
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

    def check_batch(self, batch, where):
        """Also: an AMT/FAMT model needs each image's index (and crop box and flip) to look up its
        importance map; without them it would mask at random after the refresh, silently."""
        super().check_batch(batch, where)
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not self.importance or (isinstance(x, dict) and "importance" in x):
            return
        missing = [key for key in ("index", "box", "flip") if not (isinstance(x, dict) and key in x)]
        if missing:
            raise ValueError(
                f"{where}: {self.importance.upper()} looks up each image's importance map by its index, but the "
                f"inputs have no {', '.join(repr(k) for k in missing)}; pass "
                "`keras_mfm.data.with_index(images)` (or a dict with 'importance' maps)."
            )

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
        })
        return config
