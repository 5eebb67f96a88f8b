"""Any Keras model as an encoder for the evaluation protocols.

    model: images (B, H, W, 3) in [0, 1] -> features (B, D) | tokens (B, N, D) | map (B, h, w, D)
    encoder = as_encoder(model)          # k-NN, linear probe, fine-tuning, robustness accept it

Pooling of the model's outputs: (B, D) as they are; tokens: "cls" = token 0, "mean" = the mean
of the tokens (of tokens 1.. when `cls_token=True`); a feature map: its global average. The model
gets the images as they are (in [0, 1]) and does its own preprocessing.
"""

import keras
from keras import ops

from keras_mfm.backbones.base import Backbone


@keras.saving.register_keras_serializable(package="keras_mfm")
class KerasEncoder(Backbone):
    """A Keras model from images to features, with the interface of a keras_mfm encoder.

    Args:
        model: a built Keras model with one `(B, H, W, 3)` input of static size.
        cls_token: the model's token outputs start with a [CLS] token ("mean" pooling skips it).
    """

    output_stride = 1

    def __init__(self, model, cls_token=False, **kwargs):
        shape = _input_shape(model)
        kwargs.setdefault("name", f"wrapped_{model.name}")
        super().__init__(image_size=shape[:2], **kwargs)
        self.model = model
        self.cls_token = bool(cls_token)
        output = tuple(model.compute_output_spec(keras.KerasTensor((1, *shape))).shape)
        if len(output) not in (2, 3, 4):
            raise ValueError(
                f"as_encoder: {model.name} returns shape {output}; an encoder returns (B, D) features, "
                "(B, N, D) tokens or a (B, h, w, D) feature map."
            )
        self.output_rank = len(output)
        self.num_features = int(output[-1])

    def build(self, input_shape=None):
        self.built = True

    def call(self, images, training=None):
        return self.model(images, training=training)

    def pooled_features(self, outputs, pooling="cls"):
        if self.output_rank == 2:
            return outputs
        if self.output_rank == 4:
            return ops.mean(outputs, axis=(1, 2))
        if pooling == "cls":
            return outputs[:, 0]
        if pooling == "mean":
            return ops.mean(outputs[:, 1:] if self.cls_token else outputs, axis=1)
        raise ValueError(f"Unknown pooling {pooling!r}; choose 'cls' or 'mean'.")

    def feature_map(self, outputs):
        if self.output_rank != 4:
            raise ValueError(f"{self.model.name} returns no feature map (its outputs have rank {self.output_rank}).")
        return outputs

    def get_config(self):
        config = super().get_config()
        for key in ("image_size", "mean", "std"):
            config.pop(key, None)
        config.update({"model": keras.saving.serialize_keras_object(self.model), "cls_token": self.cls_token})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


def _input_shape(model):
    if not isinstance(model, keras.Model):
        raise ValueError(f"as_encoder: expected a Keras model, got {type(model).__name__}.")
    try:
        shape = tuple(model.input_shape)
    except (AttributeError, ValueError):
        raise ValueError(
            f"as_encoder: {model.name} has no known input shape; build it on a keras.Input((H, W, 3)) first."
        ) from None
    if isinstance(shape[0], (tuple, list)) or len(shape) != 4 or shape[-1] != 3 or None in shape[1:3]:
        raise ValueError(
            f"as_encoder: {model.name} takes {shape}; an encoder takes one (batch, height, width, 3) image "
            "input of a fixed size."
        )
    return tuple(int(s) for s in shape[1:])


def as_encoder(model, cls_token=False):
    """`model` itself if it is a keras_mfm encoder, else `KerasEncoder(model, cls_token)`."""
    if isinstance(model, Backbone):
        return model
    return KerasEncoder(model, cls_token=cls_token)
