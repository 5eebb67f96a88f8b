"""Masked autoencoder (He et al., 2022) with FAMT's masking and throwing (SPEC.md section 2), in one file.

    w (B, N)    token weights: ones (MAE's random masking) or per-image importance (AMT/FAMT)
    order       weighted random order of the N patches (Gumbel-top-k on log w)
                counts (`masking.token_counts`): MAE keeps int(N (1 - mask_ratio)); AMT/FAMT mask
                int(N m), throw int(N (m + t)) - int(N m), keep the rest
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

from keras_mfm.layers.fused import Dense, LayerNormalization
from keras_mfm.layers.patches import patchify, unpatchify  # noqa: F401 - also importable from here
from keras_mfm.layers.position_embedding import sincos_2d
from keras_mfm.layers.transformer import TransformerBlock, call_sublayer
from keras_mfm.models.token_masking import TokenMaskingModel


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
        self.embed = Dense(self.hidden_dim, kernel_initializer=init, dtype=policy, name="embed")
        self.blocks = [
            TransformerBlock(self.hidden_dim, self.num_heads, self.mlp_ratio, dtype=policy, name=f"block_{i}")
            for i in range(self.depth)
        ]
        self.norm = LayerNormalization(epsilon=1e-6, dtype=policy, name="norm")
        self.predict_pixels = Dense(
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
            x = call_sublayer(self, block, x, training=training)
        x = call_sublayer(self, self.norm, x)
        return call_sublayer(self, self.predict_pixels, x[:, 1 + ops.shape(visible)[1]:])

    def get_config(self):
        config = super().get_config()
        config.update({
            "grid_size": list(self.grid_size), "patch_size": self.patch_size, "hidden_dim": self.hidden_dim,
            "depth": self.depth, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
        })
        return config


@keras.saving.register_keras_serializable(package="keras_mfm")
class MAE(TokenMaskingModel):
    """MAE pre-training around a `ViTBackbone`, with optional token throwing (FAMT).

    Inputs and the importance table: see `TokenMaskingModel` (images, or a dict with `importance`
    or with the image `index`, crop `box` and `flip` for AMT/FAMT).

    Args:
        encoder: a `keras_mfm.backbones.ViTBackbone` (MAE uses the fixed sin-cos embedding).
        mask_ratio: share of patches to reconstruct (MAE 0.75; FAMT 0.45).
        throw_ratio: share of patches thrown away (MAE 0; FAMT 0.40).
        decoder_dim, decoder_depth, decoder_heads: the decoder (MAE: 512, 8, 16).
        norm_pix_loss: per-patch normalised pixel targets, `(x - mean) / sqrt(var + 1e-6)` with
            the unbiased variance (`n - 1`, as MAE's `target.var(dim=-1)`).
        seed, importance, num_images, warmup_mask_ratio, cutoff, importance_storage, importance_location: see
            `TokenMaskingModel` (warm-up: MAE's random masking 0.75).
    """

    def __init__(self, encoder, mask_ratio=0.75, throw_ratio=0.0, decoder_dim=512, decoder_depth=8,
                 decoder_heads=16, norm_pix_loss=False, seed=None, importance=None, num_images=None,
                 warmup_mask_ratio=0.75, cutoff=0.15, **kwargs):
        super().__init__(encoder, mask_ratio, throw_ratio, seed=seed, importance=importance,
                         num_images=num_images, warmup_mask_ratio=warmup_mask_ratio, cutoff=cutoff, **kwargs)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.decoder = MAEDecoder(encoder.grid_size, encoder.patch_size, decoder_dim, decoder_depth,
                                  decoder_heads, dtype=self.dtype_policy, name="decoder")

    def build(self, input_shape=None):
        if self.built:
            return
        self.encoder.ensure_built()
        self.decoder.build((None, None, self.encoder.hidden_dim))
        self.build_importance()
        self.built = True

    def predict_masked(self, images, masking, training=None):
        """Predicted pixels of the masked patches `(B, M, p*p*3)` of a `TokenMasking` (the encoder
        sees `masking.token_indices`, the visible patches; the decoder adds mask tokens)."""
        encoded = self.encoder(images, token_indices=masking.token_indices, training=training)
        return self.decoder(encoded, masking.token_indices, masking.masked, training=training)

    def prediction_pixels(self, images, prediction, masked):
        """With `norm_pix_loss` the prediction is per-patch standardised: re-scaled first with the
        true patches' mean and (unbiased) variance, then un-normalised."""
        if self.norm_pix_loss:
            patches = patchify(self.encoder.normalize(images), self.encoder.patch_size)
            true = ops.take_along_axis(patches, ops.cast(masked, "int32")[:, :, None], axis=1)
            count = true.shape[-1]
            variance = ops.var(true, axis=-1, keepdims=True) * (count / (count - 1))
            prediction = ops.cast(prediction, "float32") * ops.sqrt(variance + 1e-6) + ops.mean(
                true, axis=-1, keepdims=True)
        return super().prediction_pixels(images, prediction, masked)

    def target(self, images):
        """`(B, N, p*p*3)` reconstruction targets: patches of the normalised image."""
        patches = patchify(self.encoder.normalize(images), self.encoder.patch_size)
        if self.norm_pix_loss:
            mean = ops.mean(patches, axis=-1, keepdims=True)
            count = patches.shape[-1]  # MAE: torch's unbiased variance (n - 1)
            variance = ops.var(patches, axis=-1, keepdims=True) * (count / (count - 1))
            patches = (patches - mean) / ops.sqrt(variance + 1e-6)
        return patches

    def reconstruction_loss(self, images, prediction, masked):
        """Mean squared error over the masked patches (thrown and visible ones do not count)."""
        target = ops.take_along_axis(self.target(images), ops.cast(masked, "int32")[:, :, None], axis=1)
        return ops.mean(ops.square(ops.cast(prediction, "float32") - target))

    def get_config(self):
        config = super().get_config()
        config.update({
            "decoder_dim": self.decoder.hidden_dim,
            "decoder_depth": self.decoder.depth,
            "decoder_heads": self.decoder.num_heads,
            "norm_pix_loss": self.norm_pix_loss,
        })
        return config

