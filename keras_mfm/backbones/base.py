"""What every keras_mfm encoder has in common."""

import keras
from keras import ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_size_pair(image_size):
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    image_size = tuple(int(s) for s in image_size)
    if len(image_size) != 2 or min(image_size) <= 0:
        raise ValueError(f"`image_size` must be a positive int or (height, width), got {image_size}.")
    return image_size


class Backbone(keras.Model):
    """Base class of the encoders: NHWC images in [0, 1] in, features out.

    The encoder normalises its input itself, `(x - mean) / std` per channel (ImageNet statistics
    by default, as in the authors' code), so a saved encoder is self-contained: feed it images in
    [0, 1] of size `image_size`.

    Subclasses define `output_stride` (pixels per feature-map cell), `num_features`,
    `feature_map(outputs)` -> `(B, H / stride, W / stride, num_features)` and
    `pooled_features(outputs)` -> `(B, num_features)`.
    """

    def __init__(self, image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size_pair(image_size)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"`mean` and `std` need 3 values each, std > 0; got {mean}, {std}.")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def normalize(self, images):
        """`(images - mean) / std` in float32 (also the MFM target's normalisation)."""
        images = ops.cast(images, "float32")
        mean = ops.convert_to_tensor(self.mean, dtype="float32")
        std = ops.convert_to_tensor(self.std, dtype="float32")
        return (images - mean) / std

    def check_images(self, images):
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(
                f"{type(self).__name__} expects NHWC RGB images (batch, height, width, 3), "
                f"got shape {shape}."
            )
        if tuple(shape[1:3]) != self.image_size:
            raise ValueError(
                f"{type(self).__name__} was built for {self.image_size[0]}x{self.image_size[1]} "
                f"images, got {shape[1]}x{shape[2]}."
            )

    def ensure_built(self):
        """Create the weights (for `(B, *image_size, 3)` inputs) if they do not exist yet."""
        if not self.built:
            self.build((None, *self.image_size, 3))

    @property
    def grid_size(self):
        return (self.image_size[0] // self.output_stride, self.image_size[1] // self.output_stride)

    def get_config(self):
        config = super().get_config()
        config.update({"image_size": list(self.image_size), "mean": list(self.mean), "std": list(self.std)})
        return config
