"""The MFM corruption: mask a low- or a high-pass part of each image's spectrum."""

import keras
from keras import ops

from keras_mfm import frequency


@keras.saving.register_keras_serializable(package="keras_mfm")
class FrequencyMasking(keras.layers.Layer):
    """Masks a centred disc (low-pass) or its complement (high-pass) of each image's spectrum.

    Per image, low-pass is drawn with probability `p_low` and high-pass otherwise; the kept-mask
    `M` (1 = kept) is the circle `|k| < radius` or its complement, shared by the channels. The
    corrupted image is `clip(real(ifft2(ifftshift(fftshift(fft2(x)) * M))), 0, 1)` (float32 FFTs).

    The corruption is the pre-training task, not an augmentation: it is applied in training and
    inference alike.

    Args:
        radius: mask radius in frequency-index units. `None` scales the authors' 16 at 224
            (`16 / 224 * min(H, W)`, about 2.29 at 32x32).
        p_low: probability of a low-pass mask (authors: 0.5 for ViT, 0.3 for ResNet-50).
        seed: int seed of the layer's `keras.random.SeedGenerator`.

    Call arguments:
        images: `(B, H, W, C)` images in [0, 1].

    Returns:
        `(corrupted, mask)`: `(B, H, W, C)` corrupted images in [0, 1] and the `(B, H, W)` float32
        kept-mask of each image.
    """

    def __init__(self, radius=None, p_low=0.5, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(p_low) <= 1.0:
            raise ValueError(f"`p_low` must be a probability in [0, 1], got {p_low}.")
        if radius is not None:
            radius = float(radius)
            if radius <= 0:
                raise ValueError(f"`radius` must be > 0, got {radius}.")
        self.radius = radius
        self.p_low = float(p_low)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self._low_pass_mask = None

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                "FrequencyMasking needs NHWC images with a static height and width, got shape "
                f"{tuple(input_shape)}."
            )
        size = (int(input_shape[1]), int(input_shape[2]))
        radius = self.radius if self.radius is not None else frequency.default_radius(size)
        self._low_pass_mask = frequency.circular_mask_numpy(size, radius, low_pass=True)
        self.built = True

    def effective_radius(self, image_size):
        return self.radius if self.radius is not None else frequency.default_radius(image_size)

    def call(self, images):
        batch = ops.shape(images)[0]
        low = ops.convert_to_tensor(self._low_pass_mask, dtype="float32")
        is_low = keras.random.uniform((batch,), seed=self.seed_generator) < self.p_low
        mask = ops.where(is_low[:, None, None], low[None], 1.0 - low[None])
        corrupted = frequency.frequency_filter(images, mask)
        return ops.cast(corrupted, self.compute_dtype), mask

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), tuple(input_shape[:3])

    def get_config(self):
        config = super().get_config()
        config.update({"radius": self.radius, "p_low": self.p_low, "seed": self.seed})
        return config
