"""Masked Frequency Modeling (Xie et al., ICLR 2023), SPEC.md section 1, in one file.

    x in [0, 1] --FrequencyMasking--> x_c, M --encoder--> features --head--> pred
    loss = frequency_loss(pred, normalise(x), M)      (masked frequencies only)

The restoration baselines are the same model with another corruption layer
(`keras_mfm.layers.restoration`: `Downsampling`, `GaussianBlur`, `AdditiveNoise`), whose kept-mask
is all zeros, so the same loss averages over the whole spectrum.

The encoder sees the whole corrupted image (no mask token); the one-layer head is a 1x1
convolution to `stride^2 * 3` channels followed by a pixel shuffle (depth-to-space) by the
encoder's output stride, so `pred` has the input's size. The loss is computed in
`compute_loss`, which the TensorFlow, JAX and PyTorch trainers of `model.fit` all call.
"""

import keras
from keras import ops

from keras_mfm.backend import scale_loss_for_replicas
from keras_mfm.frequency import frequency_loss
from keras_mfm.layers import initializers
from keras_mfm.layers.fused import Conv2D
from keras_mfm.layers.frequency_masking import FrequencyMasking
from keras_mfm.models.base import PretrainingModel

LOSSES = ("frequency", "pixel")


@keras.saving.register_keras_serializable(package="keras_mfm")
class PixelShuffleHead(keras.layers.Layer):
    """`(B, h, w, C) -> (B, h * s, w * s, channels)`: 1x1 conv to `s^2 * channels`, depth-to-space.

    Channel layout of the convolution's output: `(i * s + j) * channels + c` for the output pixel
    offset `(i, j)` and colour `c` (Keras/TF `depth_to_space`; PyTorch's `PixelShuffle` orders
    them `c * s^2 + i * s + j`). The convolution keeps PyTorch's default init (kaiming-uniform,
    a = sqrt(5), bias U(+-1/sqrt(fan_in))), as in the authors' MFM and SimMIM.
    """

    def __init__(self, stride, channels=3, **kwargs):
        super().__init__(**kwargs)
        self.stride = int(stride)
        self.channels = int(channels)
        self.conv = Conv2D(
            self.stride**2 * self.channels, 1, kernel_initializer=initializers.torch_default_kernel(),
            dtype=self.dtype_policy, name="conv"
        )

    def build(self, input_shape):
        self.conv.bias_initializer = initializers.torch_default_bias(input_shape[-1])  # fan-in = channels
        self.conv.build(input_shape)
        self.built = True

    def call(self, features):
        return ops.depth_to_space(self.conv(features), self.stride)

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        scale = lambda n: None if n is None else n * self.stride  # noqa: E731
        return (batch, scale(height), scale(width), self.channels)

    def get_config(self):
        config = super().get_config()
        config.update({"stride": self.stride, "channels": self.channels})
        return config


@keras.saving.register_keras_serializable(package="keras_mfm")
class MFM(PretrainingModel):
    """Encoder + corruption + one-layer head, trained with the frequency loss.

    Args:
        encoder: a `keras_mfm.backbones.Backbone` (ViT or ResNet-50).
        corruption: a layer `images -> (corrupted, kept_mask)`; default
            `FrequencyMasking(radius, p_low, seed, outer_radius, radius_range)`.
        radius, p_low, seed, outer_radius, radius_range: arguments of the default `FrequencyMasking`.
        masked_loss: average the loss over the masked frequencies only (the paper's choice, True)
            or over the full spectrum (False).
        loss: `"frequency"` (the frequency loss) or `"pixel"` (mean squared error of the normalised
            pixels over the whole image, the spatial-domain alternative).
        gamma: exponent of the frequency distance.
        focal, focal_alpha, focal_log, focal_batch: the focal spectrum weight matrix of the focal
            frequency loss (`frequency.focal_weights`; off in the authors' configs).

    Call: `images (B, H, W, 3)` in [0, 1] -> `(pred (B, H, W, 3), kept_mask (B, H, W))`.
    Train with `model.compile(optimizer)` (no `loss`) and `model.fit(images)`; labels, if the
    data set yields them, are ignored.
    """

    NESTED = ("encoder", "corruption")

    def __init__(
        self,
        encoder,
        corruption=None,
        radius=None,
        p_low=0.5,
        seed=None,
        masked_loss=True,
        gamma=1.0,
        loss="frequency",
        focal=False,
        focal_alpha=1.0,
        focal_log=False,
        focal_batch=False,
        outer_radius=None,
        radius_range=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if loss not in LOSSES:
            raise ValueError(f"Unknown loss {loss!r}; choose one of {LOSSES}.")
        self.encoder = encoder
        if corruption is None:
            corruption = FrequencyMasking(radius=radius, p_low=p_low, seed=seed, outer_radius=outer_radius,
                                          radius_range=radius_range, name="frequency_masking")
        self.corruption = corruption
        self.masked_loss = bool(masked_loss)
        self.gamma = float(gamma)
        self.loss_type = loss
        self.focal = bool(focal)
        self.focal_alpha = float(focal_alpha)
        self.focal_log = bool(focal_log)
        self.focal_batch = bool(focal_batch)
        self.head = PixelShuffleHead(encoder.output_stride, 3, dtype=self.dtype_policy, name="head")

    def build(self, input_shape=None):
        if self.built:
            return
        height, width = self.encoder.image_size
        shape = (None, height, width, 3)
        self.corruption.build(shape)
        self.encoder.build(shape)
        grid_height, grid_width = self.encoder.grid_size
        self.head.build((None, grid_height, grid_width, self.encoder.num_features))
        self.built = True

    def call(self, images, training=None):
        corrupted, mask = self.corruption(images)
        features = self.encoder(corrupted, training=training)
        pred = self.head(self.encoder.feature_map(features))
        return pred, mask

    def reconstruct(self, images):
        """What the model makes of `images` `(B, H, W, 3)` in [0, 1] (one draw, inference), for figures:
        `{"corrupted": (B, H, W, 3), "kept_mask": (B, H, W) (1: a kept frequency; the frequencies the
        loss scores are the others), "prediction": (B, H, W, 3)}` in pixel space (not clipped)."""
        corrupted, kept_mask = self.corruption(images)
        features = self.encoder(corrupted, training=False)
        prediction = ops.cast(self.head(self.encoder.feature_map(features)), "float32")
        std = ops.convert_to_tensor(self.encoder.std, "float32")
        mean = ops.convert_to_tensor(self.encoder.mean, "float32")
        return {"corrupted": corrupted, "kept_mask": kept_mask, "prediction": prediction * std + mean}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        pred, mask = y_pred
        target = self.encoder.normalize(x)
        if self.loss_type == "pixel":
            loss = ops.mean(ops.square(ops.cast(pred, "float32") - target))
        else:
            loss = frequency_loss(
                pred, target, mask if self.masked_loss else None, self.gamma, focal=self.focal,
                focal_alpha=self.focal_alpha, focal_log=self.focal_log, focal_batch=self.focal_batch,
            )
        for extra in self.losses:
            loss = loss + ops.cast(extra, loss.dtype)
        return scale_loss_for_replicas(loss)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "masked_loss": self.masked_loss,
                "gamma": self.gamma,
                "loss": self.loss_type,
                "focal": self.focal,
                "focal_alpha": self.focal_alpha,
                "focal_log": self.focal_log,
                "focal_batch": self.focal_batch,
            }
        )
        return config

