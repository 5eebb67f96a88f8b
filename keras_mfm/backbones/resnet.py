"""ResNet-50 encoders, in two variants.

images `(B, H, W, 3)` in [0, 1] -> feature map `(B, H / 32, W / 32, 2048)`.

- `"v1.5"` (default, presets `resnet50` and `resnet50_v1_5`): timm's and torchvision's ResNet-50,
  the one MFM pre-trains and that `keras_mfm.convert` loads PyTorch checkpoints into: a
  downsampling block strides in its 3x3 convolution, which is zero-padded by 1 on every side as in
  PyTorch (Keras' `"same"` would pad only bottom/right at even sizes), convolutions have no bias,
  BatchNorm epsilon 1e-5 and momentum 0.9 (PyTorch's 0.1), He-normal (fan-out) convolution
  kernels, and, as timm's `zero_init_last_bn`, the last BatchNorm of every residual block starts
  at gamma = 0 (each block starts as the identity). Same layer names as Keras' application
  (`conv1_conv`, `conv2_block1_1_conv`, ..., `conv5_block3_out`).
- `"v1"` (preset `resnet50_v1`): `keras.applications.ResNet50(weights=None, include_top=False)`,
  the original ResNet v1: a downsampling block strides in its first 1x1 convolution, convolutions
  have biases, BatchNorm epsilon 1.001e-5, Keras' initialisation.

Both take and return channels-last tensors and are built from `keras_mfm.layers.fused`'s
`Conv2D` / `BatchNormalization` (Keras' layers, with the same names and weights; on PyTorch they
run as PyTorch's own channels-last kernels without Keras' per-call layout copies, 1.39x faster on
the MFM training step). The network runs channels-last unless `data_format="channels_first"` is
asked for (then Keras' own convolutions, which TensorFlow's CPU kernels do not support). Kernels
have the same shape in both layouts, so the weights are the same.
"""

import keras
from keras import layers, ops

from keras_mfm.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone
from keras_mfm.layers.fused import BatchNormalization, Conv2D

VARIANTS = ("v1", "v1.5")
#: ResNet-50: (bottleneck width, blocks, stride of the first block) per stage conv2..conv5
RESNET50_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


def _conv(filters, kernel_size, strides, name, padding="valid"):
    return Conv2D(
        filters, kernel_size, strides=strides, padding=padding, use_bias=False,
        kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal"),
        name=name,
    )


def _batch_norm(name, zero_gamma=False):
    axis = 1 if keras.config.image_data_format() == "channels_first" else -1
    return BatchNormalization(axis=axis, epsilon=1e-5, momentum=0.9, name=name,
                              gamma_initializer="zeros" if zero_gamma else "ones")


def _bottleneck_v1_5(x, filters, strides, project, name, zero_init_last_bn=True):
    """1x1 -> 3x3 (strided) -> 1x1 (x4 channels), + the identity or a strided 1x1 projection."""
    shortcut = x
    if project:
        shortcut = _conv(4 * filters, 1, strides, f"{name}_0_conv")(x)
        shortcut = _batch_norm(f"{name}_0_bn")(shortcut)
    x = _conv(filters, 1, 1, f"{name}_1_conv")(x)
    x = _batch_norm(f"{name}_1_bn")(x)
    x = layers.Activation("relu", name=f"{name}_1_relu")(x)
    if strides > 1:  # PyTorch's padding=1 on every side, then a "valid" strided convolution
        x = layers.ZeroPadding2D(1, name=f"{name}_2_pad")(x)
        x = _conv(filters, 3, strides, f"{name}_2_conv")(x)
    else:
        x = _conv(filters, 3, 1, f"{name}_2_conv", padding="same")(x)
    x = _batch_norm(f"{name}_2_bn")(x)
    x = layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = _conv(4 * filters, 1, 1, f"{name}_3_conv")(x)
    x = _batch_norm(f"{name}_3_bn", zero_gamma=zero_init_last_bn)(x)
    x = layers.Add(name=f"{name}_add")([shortcut, x])
    return layers.Activation("relu", name=f"{name}_out")(x)


DATA_FORMATS = ("channels_last", "channels_first")


def default_data_format():
    """The layout the network runs in when none is given: channels-last on every backend."""
    return "channels_last"


def _with_keras_mfm_layers(model):
    """`model` rebuilt with keras_mfm's `Conv2D` / `BatchNormalization` (same configs and names)."""
    swap = {keras.layers.Conv2D: Conv2D, keras.layers.BatchNormalization: BatchNormalization}

    def clone(layer):
        return swap.get(type(layer), type(layer)).from_config(layer.get_config())

    return keras.models.clone_model(model, clone_function=clone)


def resnet50_v1(input_shape, name="resnet50"):
    """Keras' `ResNet50(weights=None, include_top=False)`, on keras_mfm's convolution layers."""
    return _with_keras_mfm_layers(
        keras.applications.ResNet50(weights=None, include_top=False, input_shape=input_shape, name=name)
    )


def resnet50_v1_5(input_shape, name="resnet50_v1_5", zero_init_last_bn=True):
    """timm's / torchvision's ResNet-50 (v1.5) without pooling and classifier, as a functional Keras
    model; `zero_init_last_bn`: gamma = 0 in each block's last BatchNorm (timm's default)."""
    inputs = keras.Input(shape=input_shape, name="input_layer")
    x = layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = _conv(64, 7, 2, "conv1_conv")(x)
    x = _batch_norm("conv1_bn")(x)
    x = layers.Activation("relu", name="conv1_relu")(x)
    x = layers.ZeroPadding2D(1, name="pool1_pad")(x)  # zeros after a ReLU: same as PyTorch's -inf
    x = layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, (filters, blocks, strides) in enumerate(RESNET50_STAGES, start=2):
        for block in range(1, blocks + 1):
            x = _bottleneck_v1_5(
                x, filters, strides if block == 1 else 1, project=block == 1, name=f"conv{stage}_block{block}",
                zero_init_last_bn=zero_init_last_bn,
            )
    return keras.Model(inputs, x, name=name)


@keras.saving.register_keras_serializable(package="keras_mfm")
class ResNetBackbone(Backbone):
    """The standard 4-stage ResNet-50 without its classifier.

    Args:
        image_size: int or (H, W), each a multiple of 32 and at least 32.
        mean, std: input normalisation (see `Backbone`).
        variant: `"v1.5"` (timm's / torchvision's, the default: MFM's network) or `"v1"` (Keras'
            application); see the module docstring.
        zero_init_last_bn: v1.5 only: start each block's last BatchNorm at gamma = 0 (timm's
            default, which MFM trains with; True) or 1.
        data_format: the layout the network runs in internally, `"channels_last"`,
            `"channels_first"` or None (the default, channels-last; resolved when the model is
            built, so a saved model follows the loading library's default). Inputs and outputs
            are channels-last either way.
    """

    def __init__(self, image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, variant="v1.5",
                 data_format=None, zero_init_last_bn=True, **kwargs):
        super().__init__(image_size=image_size, mean=mean, std=std, **kwargs)
        height, width = self.image_size
        if height % 32 or width % 32:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by ResNet-50's output stride 32."
            )
        if variant not in VARIANTS:
            raise ValueError(f"Unknown ResNet variant {variant!r}; choose one of {VARIANTS}.")
        self.variant = variant
        self.zero_init_last_bn = bool(zero_init_last_bn) and variant == "v1.5"
        if data_format not in DATA_FORMATS + (None,):
            raise ValueError(f"Unknown data_format {data_format!r}; choose one of {DATA_FORMATS} or None.")
        self.data_format = data_format
        self.channels_first = (data_format or default_data_format()) == "channels_first"
        input_shape = (3, height, width) if self.channels_first else (height, width, 3)
        # keras.applications, `_batch_norm`, convolutions, padding and pooling read the global format
        saved_format = keras.config.image_data_format()
        keras.config.set_image_data_format("channels_first" if self.channels_first else "channels_last")
        try:
            if variant == "v1":
                self.resnet = resnet50_v1(input_shape)
            else:
                self.resnet = resnet50_v1_5(input_shape, zero_init_last_bn=self.zero_init_last_bn)
        finally:
            keras.config.set_image_data_format(saved_format)

    @property
    def output_stride(self):
        return 32

    @property
    def num_features(self):
        return 2048

    def build(self, input_shape=None):
        self.built = True

    def call(self, images, training=None):
        self.check_images(images)
        x = ops.cast(self.normalize(images), self.compute_dtype)
        if self.channels_first:
            x = ops.transpose(x, (0, 3, 1, 2))
            return ops.transpose(self.resnet(x, training=training), (0, 2, 3, 1))
        return self.resnet(x, training=training)

    def compute_output_shape(self, input_shape):
        height, width = self.grid_size
        return (input_shape[0], height, width, 2048)

    def feature_map(self, outputs):
        return outputs

    def pooled_features(self, outputs, pooling="mean"):
        """`(B, 2048)` globally average-pooled features."""
        if pooling not in ("mean", "avg"):
            raise ValueError(f"ResNet features are average-pooled; got pooling={pooling!r}.")
        return ops.mean(outputs, axis=(1, 2))

    def get_config(self):
        config = super().get_config()
        config["variant"] = self.variant
        config["data_format"] = self.data_format
        config["zero_init_last_bn"] = self.zero_init_last_bn
        return config
