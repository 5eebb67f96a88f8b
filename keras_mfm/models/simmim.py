"""SimMIM (Xie et al., CVPR 2022), with FAMT's masking and throwing as an option, in one file.

    random      U mask units (squares of `mask_patch_size`, a multiple of the patch size p);
                ceil(mask_ratio * U) of them masked at random, spread to their (mask_patch_size/p)^2
                patches: M masked patches per image (SimMIM: mask patch 32 for p = 16, ratio 0.6)
    FAMT        `masking.select_tokens` by importance (patch granularity): masked, thrown, visible
    z           = encoder(x, masked patches' embeddings replaced by a learned mask token before the
                  position embedding; thrown patches removed from the sequence)
    pred        = Linear(D -> p * p * 3) of each masked patch's token, (B, M, p*p*3)
                  (SimMIM's one-layer head, a 1x1 convolution + pixel shuffle by p, is this linear
                  map applied per token)
    loss        = mean |pred - target| over the masked patches' pixels and channels,
                  target = patchify(normalise(x))   (SimMIM's L1 on the masked pixels)

Unlike MAE, the encoder sees the masked positions (as mask tokens) and there is no decoder; with
FAMT the thrown patches are in neither the encoder sequence nor the loss (SPEC.md section 2). The
number of masked patches depends only on the ratios, so each configuration compiles once.
"""

import math

import keras
from keras import ops

from keras_mfm.layers import initializers
from keras_mfm.layers.fused import Dense
from keras_mfm.layers.patches import patchify
from keras_mfm.models.token_masking import (TokenMasking, TokenMaskingModel, masking_of_patch_mask,
                                           masking_of_selection)

#: SimMIM's ratio for ViT (0.6); the FAMT variant uses FAMT's 0.45 / 0.40 (see `methods.DEFAULT_RATIOS`).
SIMMIM_MASK_RATIO = 0.6


#: SimMIM's draws are `TokenMasking` records (the same as MAE's); the old name stays as an alias.
SimMIMMasking = TokenMasking


def default_mask_patch_size(encoder):
    """SimMIM's mask patch is 2 x the ViT patch (32 for p = 16), if the image holds whole units."""
    size = 2 * encoder.patch_size
    height, width = encoder.image_size
    return size if height % size == 0 and width % size == 0 else encoder.patch_size


@keras.saving.register_keras_serializable(package="keras_mfm")
class SimMIM(TokenMaskingModel):
    """SimMIM pre-training around a `ViTBackbone`, optionally with FAMT's masking and throwing.

    Inputs: see `TokenMaskingModel`. Call -> `(pred (B, M, p*p*3), masked (B, M))`, the
    predictions of the masked patches and their row-major indices.

    Args:
        encoder: a `keras_mfm.backbones.ViTBackbone`.
        mask_ratio: share of mask units (random masking) or patches (FAMT) to predict (0.6).
        throw_ratio: share of patches thrown away (FAMT only; 0 for SimMIM).
        mask_patch_size: side of a random-masking unit in pixels, a multiple of the patch size
            (None: `default_mask_patch_size`). With `importance` it must be the patch size.
        seed, importance, num_images, warmup_mask_ratio, cutoff, importance_storage, importance_location: see
            `TokenMaskingModel` (warm-up: random patch masking at SimMIM's 0.6).
    """

    def __init__(self, encoder, mask_ratio=SIMMIM_MASK_RATIO, throw_ratio=0.0, mask_patch_size=None, seed=None,
                 importance=None, num_images=None, warmup_mask_ratio=SIMMIM_MASK_RATIO, cutoff=0.15, **kwargs):
        super().__init__(encoder, mask_ratio, throw_ratio, seed=seed, importance=importance,
                         num_images=num_images, warmup_mask_ratio=warmup_mask_ratio, cutoff=cutoff, **kwargs)
        patch = encoder.patch_size
        if mask_patch_size is None:
            mask_patch_size = patch if importance else default_mask_patch_size(encoder)
        mask_patch_size = int(mask_patch_size)
        height, width = encoder.image_size
        if mask_patch_size < patch or mask_patch_size % patch or height % mask_patch_size or width % mask_patch_size:
            raise ValueError(
                f"`mask_patch_size` must be a multiple of the patch size {patch} that divides the image size "
                f"{height}x{width}; got {mask_patch_size}."
            )
        if importance and mask_patch_size != patch:
            raise ValueError(
                f"SimMIM with {importance} importance masks single patches: `mask_patch_size` must be the patch "
                f"size {patch}, got {mask_patch_size}."
            )
        if throw_ratio and not importance:
            raise ValueError("Throwing tokens (`throw_ratio` > 0) needs importance masking ('amt' or 'famt').")
        self.mask_patch_size = mask_patch_size
        self.unit_grid = (height // mask_patch_size, width // mask_patch_size)
        units = self.unit_grid[0] * self.unit_grid[1]
        self.masked_units = int(math.ceil(units * self.mask_ratio))  # SimMIM rounds up
        if not importance and self.masked_units >= units:
            raise ValueError(f"mask_ratio={mask_ratio} masks all {units} mask units; nothing stays visible.")
        # SimMIM's head (a 1x1 convolution) keeps PyTorch's default init
        self.head = Dense(3 * patch * patch, kernel_initializer=initializers.torch_default_kernel(),
                          bias_initializer=initializers.torch_default_bias(encoder.hidden_dim),
                          dtype=self.dtype_policy, name="head")

    def build(self, input_shape=None):
        if self.built:
            return
        self.encoder.ensure_built()
        self.mask_token = self.add_weight(
            shape=(1, 1, self.encoder.hidden_dim),
            initializer=initializers.TruncatedNormal(0.02),  # SimMIM's +-1 std cut
            name="mask_token",
        )
        self.head.build((None, None, self.encoder.hidden_dim))
        self.build_importance()
        self.built = True

    # -- masking -------------------------------------------------------------------------------
    def random_unit_mask(self, batch):
        """SimMIM's random mask on the patch grid, `(B, N)` float32 (1 = masked), and the masked
        patches' indices `(B, M)` (ascending)."""
        rows, cols = self.unit_grid
        noise = keras.random.uniform((batch, rows * cols), seed=self.seed_generator)
        rank = ops.argsort(ops.argsort(noise, axis=1), axis=1)
        units = ops.cast(rank < self.masked_units, "float32")
        scale = self.mask_patch_size // self.encoder.patch_size
        grid = ops.reshape(units, (batch, rows, 1, cols, 1))
        grid = ops.broadcast_to(grid, (batch, rows, scale, cols, scale))
        patch_mask = ops.reshape(grid, (batch, self.encoder.num_patches))
        num_masked = self.masked_units * scale * scale
        # Masked patches first, ascending: score = mask * 2N - index is distinct and orders them.
        positions = ops.arange(self.encoder.num_patches, dtype="float32")
        _, masked = ops.top_k(patch_mask * (2.0 * self.encoder.num_patches) - positions, num_masked)
        return patch_mask, ops.cast(masked, "int32")

    def draw(self, images, importance=None):
        """The `TokenMasking` of a batch.

        Random masking: whole mask units, every patch goes to the encoder (`token_indices` None).
        With importance (FAMT/AMT): `select_tokens`' masked/thrown/visible patches; the encoder gets
        the visible and masked ones (`token_indices` `(B, V + M)`, masked last).
        """
        if not self.importance:
            patch_mask, masked = self.random_unit_mask(ops.shape(images)[0])
            return masking_of_patch_mask(patch_mask, masked)
        return masking_of_selection(self.select(images, importance), encoder_sees_masked=True)

    def reconstruct(self, images, importance=None):
        if importance is not None and not self.importance:
            raise ValueError(f"{self.name} masks random units of {self.mask_patch_size} pixels; it draws no "
                             "patches by importance (build SimMIM with importance='famt' for that).")
        return super().reconstruct(images, importance)

    def predict_masked(self, images, masking, training=None):
        """Predicted pixels of the masked patches `(B, M, p*p*3)` of a `TokenMasking` (masked patches
        enter the encoder as the mask token)."""
        encoded = self.encoder(images, token_indices=masking.token_indices, patch_mask=masking.patch_mask,
                               mask_token=self.mask_token, training=training)
        if masking.token_indices is not None:  # the masked patches are the last M tokens
            masked_tokens = encoded[:, -ops.shape(masking.masked)[1]:]
        else:
            masked_tokens = ops.take_along_axis(encoded[:, 1:], masking.masked[:, :, None], axis=1)
        return self.head(masked_tokens)

    # -- loss ----------------------------------------------------------------------------------
    def reconstruction_loss(self, images, prediction, masked):
        """Mean absolute error over the masked patches' pixels (visible and thrown ones do not count)."""
        target = patchify(self.encoder.normalize(images), self.encoder.patch_size)
        target = ops.take_along_axis(target, ops.cast(masked, "int32")[:, :, None], axis=1)
        return ops.mean(ops.abs(ops.cast(prediction, "float32") - target))

    def get_config(self):
        config = super().get_config()
        config["mask_patch_size"] = self.mask_patch_size
        return config
