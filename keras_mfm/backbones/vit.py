"""Vision Transformer encoder (Dosovitskiy et al.), the MFM/MAE variant.

patch embedding (a `p x p` convolution with stride `p`) -> + absolute position embedding ->
[CLS] prepended -> `depth` pre-norm transformer blocks -> final LayerNorm.

Shapes: images `(B, H, W, 3)` in [0, 1] -> tokens `(B, 1 + N, D)` with `N = (H / p) * (W / p)`
([CLS] first, patches row-major). For masked image modeling the encoder can run on a subset of the
patches (`token_indices`, `(B, K)`, after the position embedding is added), and can return the
last block's softmax attention `(B, heads, 1 + K, 1 + K)`; the other blocks always use the fused
`keras.ops.dot_product_attention` path.
"""

import keras
from keras import ops

from keras_mfm.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone
from keras_mfm.layers import initializers
from keras_mfm.layers.fused import Conv2D, LayerNormalization
from keras_mfm.layers.position_embedding import sincos_2d
from keras_mfm.layers.transformer import TransformerBlock, call_sublayer

POSITION_EMBEDDINGS = ("learned", "sincos")


@keras.saving.register_keras_serializable(package="keras_mfm")
class ViTBackbone(Backbone):
    """ViT encoder.

    Args:
        image_size: int or (H, W), divisible by `patch_size`.
        patch_size: patch side `p` (16 for ViT-B/16; 4 suits 32x32 images).
        hidden_dim, depth, num_heads, mlp_ratio: the width `D`, number of blocks, heads, MLP ratio.
        qkv_bias: bias in the fused qkv projection.
        position_embedding: `"learned"` or `"sincos"` (fixed 2-D).
        drop_path_rate: stochastic depth, linearly increasing from 0 to this rate over the blocks
            (0 for MFM/MAE pre-training, 0.1 for SimMIM's and for fine-tuning).
        init: weight-init scheme of new weights, `"mae"` (xavier-uniform), `"mfm"` or `"simmim"`
            (BEiT's truncated normal with rescaled residual branches); see
            `keras_mfm.layers.initializers`. Each pre-training method picks its authors' scheme.
        layer_scale: initial per-channel layer scale of the residual branches (SimMIM: 0.1), or
            None for none.
        layer_norm_epsilon: epsilon of every LayerNorm.
        mean, std: input normalisation (see `Backbone`).
    """

    def __init__(
        self,
        image_size=224,
        patch_size=16,
        hidden_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        position_embedding="learned",
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        init="mae",
        layer_scale=None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        **kwargs,
    ):
        super().__init__(image_size=image_size, mean=mean, std=std, **kwargs)
        patch_size = int(patch_size)
        if patch_size <= 0:
            raise ValueError(f"`patch_size` must be a positive int, got {patch_size}.")
        height, width = self.image_size
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by the patch size {patch_size}: "
                "choose an image size that is a multiple of the patch size."
            )
        if hidden_dim % num_heads:
            raise ValueError(
                f"`hidden_dim` ({hidden_dim}) must be divisible by `num_heads` ({num_heads})."
            )
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"Unknown position_embedding {position_embedding!r}; choose one of {POSITION_EMBEDDINGS}."
            )
        if depth < 1:
            raise ValueError(f"`depth` must be >= 1, got {depth}.")
        self.patch_size = patch_size
        self.hidden_dim = int(hidden_dim)
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.position_embedding_type = position_embedding
        self.drop_path_rate = float(drop_path_rate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.init = initializers.check_scheme(init)
        self.layer_scale = None if layer_scale is None else float(layer_scale)

        policy = self.dtype_policy
        kernel_init, bias_init = initializers.patch_embedding(init, patch_size, 3, self.hidden_dim)
        self.patch_embedding = Conv2D(
            self.hidden_dim,
            patch_size,
            strides=patch_size,
            padding="valid",
            kernel_initializer=kernel_init,
            bias_initializer=bias_init,
            dtype=policy,
            name="patch_embedding",
        )
        rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
        self.blocks = [
            TransformerBlock(
                self.hidden_dim,
                self.num_heads,
                self.mlp_ratio,
                self.qkv_bias,
                drop_path_rate=rate,
                layer_norm_epsilon=self.layer_norm_epsilon,
                init=self.init,
                layer_id=i + 1,
                layer_scale=self.layer_scale,
                dtype=policy,
                name=f"block_{i}",
            )
            for i, rate in enumerate(rates)
        ]
        self.norm = LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=policy, name="norm"
        )

    # -- geometry -----------------------------------------------------------------------------
    @property
    def output_stride(self):
        return self.patch_size

    @property
    def num_features(self):
        return self.hidden_dim

    @property
    def num_patches(self):
        height, width = self.grid_size
        return height * width

    # -- weights ------------------------------------------------------------------------------
    def build(self, input_shape=None):
        if self.built:
            return
        height, width = self.image_size
        self.patch_embedding.build((None, height, width, 3))
        self.cls_token = self.add_weight(
            shape=(1, 1, self.hidden_dim),
            initializer=initializers.token(self.init),
            name="cls_token",
        )
        num_positions = 1 + self.num_patches
        if self.position_embedding_type == "learned":
            self.position_embedding = self.add_weight(
                shape=(1, num_positions, self.hidden_dim),
                initializer=initializers.token(self.init),
                name="position_embedding",
            )
        else:
            table = sincos_2d(self.hidden_dim, self.grid_size, cls_token=True)
            self.position_embedding = self.add_weight(
                shape=(1, num_positions, self.hidden_dim),
                initializer=keras.initializers.Constant(table[None]),
                trainable=False,
                name="position_embedding",
            )
        for block in self.blocks:
            block.build((None, None, self.hidden_dim))
        self.norm.build((None, None, self.hidden_dim))
        self.built = True

    # -- forward ------------------------------------------------------------------------------
    def embed_patches(self, images, patch_mask=None, mask_token=None):
        """`(B, H, W, 3)` in [0, 1] -> patch tokens with position embedding, `(B, N, D)`.

        With `patch_mask` `(B, N)` (1 = masked) and `mask_token` `(1, 1, D)`, the embeddings of
        the masked patches are replaced by the mask token before the position embedding is added
        (SimMIM): `x = (1 - m) * embed(x) + m * mask_token + pos`.
        """
        self.check_images(images)
        x = ops.cast(self.normalize(images), self.compute_dtype)
        x = self.patch_embedding(x)
        x = ops.reshape(x, (ops.shape(x)[0], self.num_patches, self.hidden_dim))
        if patch_mask is not None:
            if mask_token is None:
                raise ValueError("`patch_mask` needs a `mask_token` of shape (1, 1, hidden_dim).")
            weight = ops.cast(patch_mask, x.dtype)[:, :, None]
            x = x * (1.0 - weight) + ops.cast(mask_token, x.dtype) * weight
        return x + ops.cast(self.position_embedding[:, 1:], x.dtype)

    def prepend_cls(self, tokens):
        """`(B, K, D) -> (B, 1 + K, D)`: [CLS] (+ its position embedding) in front."""
        cls = ops.cast(self.cls_token + self.position_embedding[:, :1], tokens.dtype)
        cls = ops.broadcast_to(cls, (ops.shape(tokens)[0], 1, self.hidden_dim))
        return ops.concatenate([cls, tokens], axis=1)

    def call(self, images, token_indices=None, return_attention=False, training=None, patch_mask=None,
             mask_token=None):
        """Encode images.

        Args:
            images: `(B, H, W, 3)` in [0, 1].
            token_indices: optional int `(B, K)`: keep only these patches (row-major indices).
            return_attention: also return the last block's attention `(B, heads, 1+K, 1+K)`.
            patch_mask, mask_token: optional `(B, N)` 0/1 mask and `(1, 1, D)` token that replaces
                the masked patches' embeddings (SimMIM; see `embed_patches`).

        Returns:
            tokens `(B, 1 + K, D)` after the final LayerNorm (`K = N` without `token_indices`),
            or `(tokens, attention)`.
        """
        x, attention = self.encode(images, token_indices, return_attention, training, patch_mask, mask_token)
        x = self.norm(x)
        if return_attention:
            return x, attention
        return x

    def encode(self, images, token_indices=None, return_attention=False, training=None, patch_mask=None,
               mask_token=None):
        """The last block's output before the final LayerNorm, `(B, 1 + K, D)`, and its attention
        `(B, heads, 1 + K, 1 + K)` (None unless `return_attention`); FAMT reads both."""
        self.ensure_built()
        x = self.embed_patches(images, patch_mask, mask_token)
        if token_indices is not None:
            token_indices = ops.cast(token_indices, "int32")
            x = ops.take_along_axis(x, token_indices[:, :, None], axis=1)
        x = self.prepend_cls(x)
        for block in self.blocks[:-1]:
            x = call_sublayer(self, block, x, training=training)
        x = call_sublayer(self, self.blocks[-1], x, return_attention=return_attention, training=training)
        if return_attention:
            return x
        return x, None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1 + self.num_patches, self.hidden_dim)

    def feature_map(self, outputs):
        """Patch tokens of `call`'s output as a grid, `(B, H / p, W / p, D)`."""
        height, width = self.grid_size
        return ops.reshape(outputs[:, 1:], (ops.shape(outputs)[0], height, width, self.hidden_dim))

    def pooled_features(self, outputs, pooling="cls"):
        """`(B, D)` image features: the [CLS] token (`"cls"`) or the mean patch token (`"mean"`)."""
        if pooling == "cls":
            return outputs[:, 0]
        if pooling == "mean":
            return ops.mean(outputs[:, 1:], axis=1)
        raise ValueError(f"Unknown pooling {pooling!r}; choose 'cls' or 'mean'.")

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "patch_size": self.patch_size,
                "hidden_dim": self.hidden_dim,
                "depth": self.depth,
                "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio,
                "qkv_bias": self.qkv_bias,
                "position_embedding": self.position_embedding_type,
                "drop_path_rate": self.drop_path_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "init": self.init,
                "layer_scale": self.layer_scale,
            }
        )
        return config
