"""ResNet-50 encoder: `keras.applications.ResNet50(weights=None, include_top=False)`.

images `(B, H, W, 3)` in [0, 1] -> feature map `(B, H / 32, W / 32, 2048)`.
"""

import keras
from keras import ops

from keras_mfm.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone


@keras.saving.register_keras_serializable(package="keras_mfm")
class ResNetBackbone(Backbone):
    """The standard 4-stage ResNet-50 without its classifier (Keras core's application).

    Args:
        image_size: int or (H, W), each a multiple of 32 and at least 32.
        mean, std: input normalisation (see `Backbone`).
    """

    def __init__(self, image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs):
        super().__init__(image_size=image_size, mean=mean, std=std, **kwargs)
        height, width = self.image_size
        if height % 32 or width % 32:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by ResNet-50's output stride 32."
            )
        self.resnet = keras.applications.ResNet50(
            weights=None, include_top=False, input_shape=(height, width, 3), name="resnet50"
        )

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
