"""Masked autoencoder (He et al., 2022) with FAMT's masking and throwing (SPEC.md section 2), in one file.

    w (B, N)    token weights: ones (MAE's random masking) or per-image importance (AMT/FAMT)
    order       weighted random order of the N patches (Gumbel-top-k on log w)
                masked = first int(mask_ratio N), thrown = next int(throw_ratio N), visible = rest
    z           = encoder(x, visible patches only)                      (B, 1 + V, D)
    decoder     Linear(D -> D_dec); [CLS, visible + pos, mask_token + pos(masked)]  (thrown: absent)
                -> blocks -> LayerNorm -> Linear(p * p * 3), read at the masked positions (B, M, p*p*3)
    loss        mean over masked patches and their pixels of (pred - target)^2,
                target = patchify(normalise(x)), per patch normalised with `norm_pix_loss`

The decoder is a set of tokens with position embeddings, so the order of the tokens in its
sequence does not matter and no un-shuffling is needed; thrown patches appear nowhere (encoder,
decoder, loss), which is what makes a FAMT step cheaper. Shapes depend only on the ratios, so each
configuration compiles once. The loss is in `compute_loss` (all three `model.fit` trainers).
"""

import keras
from keras import ops

from keras_mfm.layers.position_embedding import sincos_2d
from keras_mfm.layers.transformer import TransformerBlock
from keras_mfm.masking import check_weights, follow_augmentation, select_tokens, token_counts
from keras_mfm.models.base import EncoderModel


def patchify(images, patch_size):
    """`(B, H, W, C) -> (B, N, p * p * C)`, patches row-major, pixels `(row, col, channel)` inside."""
    batch, height, width, channels = ops.shape(images)
    p = patch_size
    x = ops.reshape(images, (batch, height // p, p, width // p, p, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (batch, (height // p) * (width // p), p * p * channels))


def unpatchify(patches, patch_size, grid_size, channels=3):
    """Inverse of `patchify`: `(B, N, p * p * C) -> (B, H, W, C)`."""
    batch = ops.shape(patches)[0]
    (rows, cols), p = grid_size, patch_size
    x = ops.reshape(patches, (batch, rows, cols, p, p, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (batch, rows * p, cols * p, channels))


@keras.saving.register_keras_serializable(package="keras_mfm")
class MAEDecoder(keras.layers.Layer):
    """MAE's light decoder: `(encoded (B, 1 + V, D), visible (B, V), masked (B, M)) -> (B, M, p*p*3)`.

    Args:
        grid_size: `(h, w)` patch grid of the encoder.
        patch_size: patch side `p`.
        hidden_dim, depth, num_heads, mlp_ratio: the decoder transformer (MAE: 512, 8, 16, 4).
    """

    def __init__(self, grid_size, patch_size, hidden_dim=512, depth=8, num_heads=16, mlp_ratio=4.0, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.patch_size = int(patch_size)
        self.hidden_dim = int(hidden_dim)
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        policy = self.dtype_policy
        init = keras.initializers.GlorotUniform()
        self.embed = keras.layers.Dense(self.hidden_dim, kernel_initializer=init, dtype=policy, name="embed")
        self.blocks = [
            TransformerBlock(self.hidden_dim, self.num_heads, self.mlp_ratio, dtype=policy, name=f"block_{i}")
            for i in range(self.depth)
        ]
        self.norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=policy, name="norm")
        self.predict_pixels = keras.layers.Dense(
            self.patch_size**2 * 3, kernel_initializer=init, dtype=policy, name="predict_pixels"
        )

    def build(self, input_shape):
        self.embed.build(input_shape)
        self.mask_token = self.add_weight(
            shape=(1, 1, self.hidden_dim), initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="mask_token",
        )
        table = sincos_2d(self.hidden_dim, self.grid_size, cls_token=True)
        self.position_embedding = self.add_weight(
            shape=table.shape, initializer=keras.initializers.Constant(table), trainable=False,
            name="position_embedding",
        )
        for block in self.blocks:
            block.build((None, None, self.hidden_dim))
        self.norm.build((None, None, self.hidden_dim))
        self.predict_pixels.build((None, None, self.hidden_dim))
        self.built = True

    def call(self, encoded, visible, masked, training=None):
        x = self.embed(encoded)
        table = ops.cast(self.position_embedding, x.dtype)
        patches = table[1:]
        cls = x[:, :1] + table[:1]
        visible_tokens = x[:, 1:] + ops.take(patches, visible, axis=0)
        mask_tokens = ops.cast(self.mask_token, x.dtype) + ops.take(patches, masked, axis=0)
        x = ops.concatenate([cls, visible_tokens, mask_tokens], axis=1)
        for block in self.blocks:
            x = block(x, training=training)
        x = self.norm(x)
        return self.predict_pixels(x[:, 1 + ops.shape(visible)[1]:])

    def get_config(self):
        config = super().get_config()
        config.update({
            "grid_size": list(self.grid_size), "patch_size": self.patch_size, "hidden_dim": self.hidden_dim,
            "depth": self.depth, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
        })
        return config


@keras.saving.register_keras_serializable(package="keras_mfm")
class MAE(EncoderModel):
    """MAE pre-training around a `ViTBackbone`, with optional token throwing (FAMT).

    Inputs: images `(B, H, W, 3)` in [0, 1], or `{"images": ..., "importance": (B, N)}` to draw
    the masked/thrown patches by importance instead of uniformly, or (AMT/FAMT, `importance` set)
    `{"images", "index", "box", "flip"}` (`data.pretraining_dataset(with_geometry=True)`): each
    image's map is read from the importance table, cropped and flipped like the image, and drives
    the draw once the table has been filled (before that: random masking at `warmup_mask_ratio`,
    no throwing).

    Args:
        encoder: a `keras_mfm.backbones.ViTBackbone` (MAE uses the fixed sin-cos embedding).
        mask_ratio: share of patches to reconstruct (MAE 0.75; FAMT 0.45).
        throw_ratio: share of patches thrown away (MAE 0; FAMT 0.40).
        decoder_dim, decoder_depth, decoder_heads: the decoder (MAE: 512, 8, 16).
        norm_pix_loss: per-patch normalised pixel targets (mean 0, variance 1 per patch).
        seed: seed of the token draws.
        importance: None (MAE), "amt" or "famt": keep an importance table of `num_images` maps.
        num_images: rows of the importance table (the training split's size).
        warmup_mask_ratio: random masking before the table is filled (MAE's 0.75).
        cutoff: FAMT's low-pass cut-off (0.15 of N).
    """

    def __init__(self, encoder, mask_ratio=0.75, throw_ratio=0.0, decoder_dim=512, decoder_depth=8,
                 decoder_heads=16, norm_pix_loss=False, seed=None, importance=None, num_images=None,
                 warmup_mask_ratio=0.75, cutoff=0.15, **kwargs):
        super().__init__(**kwargs)
        if not hasattr(encoder, "patch_size"):
            raise ValueError(f"MAE needs a ViT encoder (patch tokens), got {type(encoder).__name__}.")
        self.encoder = encoder
        self.mask_ratio = float(mask_ratio)
        self.throw_ratio = float(throw_ratio)
        self.counts = token_counts(encoder.num_patches, self.mask_ratio, self.throw_ratio)
        if self.counts[0] < 1:
            raise ValueError(f"MAE needs at least one masked patch to reconstruct; mask_ratio={mask_ratio}.")
        self.norm_pix_loss = bool(norm_pix_loss)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.decoder = MAEDecoder(encoder.grid_size, encoder.patch_size, decoder_dim, decoder_depth,
                                  decoder_heads, dtype=self.dtype_policy, name="decoder")
        if importance not in (None, "amt", "famt"):
            raise ValueError(f"Unknown importance {importance!r}; choose None (MAE), 'amt' or 'famt'.")
        if importance and (num_images is None or int(num_images) < 1):
            raise ValueError("An importance table needs `num_images` (the number of training images).")
        self.importance = importance
        self.num_images = int(num_images) if importance else None
        self.warmup_mask_ratio = float(warmup_mask_ratio)
        token_counts(encoder.num_patches, self.warmup_mask_ratio, 0.0)  # validates the warm-up ratio
        self.cutoff = float(cutoff)
        self.importance_ready = False  # Python-level phase: shapes differ before/after the first refresh

    def build(self, input_shape=None):
        if self.built:
            return
        self.encoder.ensure_built()
        self.decoder.build((None, None, self.encoder.hidden_dim))
        if self.importance:
            self.importance_table = self.add_weight(
                shape=(self.num_images, self.encoder.num_patches), initializer="ones", trainable=False,
                name="importance_table",
            )
            self.refresh_count = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                                 name="refresh_count")
        self.built = True

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
        mask_ratio, throw_ratio = self.mask_ratio, self.throw_ratio
        if importance is None:
            importance = ops.ones((ops.shape(images)[0], self.encoder.num_patches), "float32")
            if self.importance and not self.importance_ready:
                mask_ratio, throw_ratio = self.warmup_mask_ratio, 0.0
        return select_tokens(importance, mask_ratio, throw_ratio, seed=self.seed_generator, validate=False)

    def reconstruct(self, images, selection, training=None):
        """Predicted pixels of the masked patches `(B, M, p*p*3)` for a given token selection."""
        encoded = self.encoder(images, token_indices=selection.visible, training=training)
        return self.decoder(encoded, selection.visible, selection.masked, training=training)

    def call(self, inputs, training=None):
        images, importance = self.split_inputs(inputs)
        selection = self.select(images, importance)
        return self.reconstruct(images, selection, training=training), selection.masked

    def target(self, images):
        """`(B, N, p*p*3)` reconstruction targets: patches of the normalised image."""
        patches = patchify(self.encoder.normalize(images), self.encoder.patch_size)
        if self.norm_pix_loss:
            mean = ops.mean(patches, axis=-1, keepdims=True)
            variance = ops.var(patches, axis=-1, keepdims=True)
            patches = (patches - mean) / ops.sqrt(variance + 1e-6)
        return patches

    def reconstruction_loss(self, images, prediction, masked):
        """Mean squared error over the masked patches (thrown and visible ones do not count)."""
        target = ops.take_along_axis(self.target(images), ops.cast(masked, "int32")[:, :, None], axis=1)
        return ops.mean(ops.square(ops.cast(prediction, "float32") - target))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        images, _ = self.split_inputs(x)
        prediction, masked = y_pred
        loss = self.reconstruction_loss(images, prediction, masked)
        return loss + ops.cast(ops.sum(self.losses), "float32") if self.losses else loss

    def get_config(self):
        config = super().get_config()
        config.update({
            "mask_ratio": self.mask_ratio,
            "throw_ratio": self.throw_ratio,
            "decoder_dim": self.decoder.hidden_dim,
            "decoder_depth": self.decoder.depth,
            "decoder_heads": self.decoder.num_heads,
            "norm_pix_loss": self.norm_pix_loss,
            "seed": self.seed,
            "importance": self.importance,
            "num_images": self.num_images,
            "warmup_mask_ratio": self.warmup_mask_ratio,
            "cutoff": self.cutoff,
        })
        return config

