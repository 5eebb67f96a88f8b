"""An encoder with a classification head: what the linear probe and fine-tuning train.

    images (B, H, W, 3) in [0, 1] --encoder--> tokens / feature map --pool--> (B, D)
        --head--> logits (B, num_classes), float32

Heads (SPEC.md):

- `"linear_probe"` (MAE's linear probe): `BatchNormalization(center=False, scale=False)` (no affine)
  then a linear layer (truncated-normal init, std 0.01); the encoder stays frozen.
- `"finetune"` (MFM/MAE fine-tuning): `LayerNormalization` then a linear layer (std 2e-5 init), on
  mean-pooled tokens; the whole model is trained.
"""

import keras
from keras import ops

from keras_mfm.backbones.wrapped import as_encoder
from keras_mfm.models.base import EncoderModel

HEADS = ("linear_probe", "finetune")


def build_head(kind, num_classes, dtype=None):
    """The classification head of `kind` as a `keras.Sequential` named "head"."""
    if kind == "linear_probe":
        norm = keras.layers.BatchNormalization(center=False, scale=False, epsilon=1e-6, dtype=dtype, name="bn")
        std = 0.01
    elif kind == "finetune":
        norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype=dtype, name="fc_norm")
        std = 2e-5
    else:
        raise ValueError(f"Unknown head {kind!r}; choose one of {HEADS}.")
    linear = keras.layers.Dense(
        num_classes, kernel_initializer=keras.initializers.TruncatedNormal(stddev=std), dtype=dtype, name="linear"
    )
    return keras.Sequential([norm, linear], name="head")


@keras.saving.register_keras_serializable(package="keras_mfm")
class ImageClassifier(EncoderModel):
    """`encoder` + pooling + `head`, returning float32 logits.

    Args:
        encoder: a `keras_mfm.backbones.Backbone`.
        num_classes: number of classes.
        pooling: `"cls"` or `"mean"` for a ViT (default `"mean"` for the fine-tuning head, `"cls"`
            for the linear probe, as in MAE), `"mean"` (global average) for ResNet.
        head: `"linear_probe"` or `"finetune"` (see the module docstring).
        class_names: optional list of the class names, kept in the saved file.
    """

    def __init__(self, encoder, num_classes, pooling=None, head="finetune", class_names=None, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ValueError(f"A classifier needs at least 2 classes, got num_classes={num_classes}.")
        if head not in HEADS:
            raise ValueError(f"Unknown head {head!r}; choose one of {HEADS}.")
        if class_names is not None and len(class_names) != int(num_classes):
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes.")
        encoder = as_encoder(encoder)
        if pooling is None:
            is_vit = hasattr(encoder, "patch_size")
            pooling = ("cls" if head == "linear_probe" else "mean") if is_vit else "mean"
        self.encoder = encoder
        self.num_classes = int(num_classes)
        self.pooling = pooling
        self.head_type = head
        self.class_names = list(class_names) if class_names is not None else None
        self.head = build_head(head, self.num_classes, dtype=self.dtype_policy)

    @property
    def image_size(self):
        return self.encoder.image_size

    def build(self, input_shape=None):
        if self.built:
            return
        self.encoder.ensure_built()
        self.head.build((None, self.encoder.num_features))
        self.built = True

    def features(self, images, training=None):
        """Pooled encoder features `(B, D)`."""
        return self.encoder.pooled_features(self.encoder(images, training=training), self.pooling)

    def call(self, images, training=None):
        return ops.cast(self.head(self.features(images, training=training), training=training), "float32")

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "pooling": self.pooling,
                "head": self.head_type,
                "class_names": self.class_names,
            }
        )
        return config

