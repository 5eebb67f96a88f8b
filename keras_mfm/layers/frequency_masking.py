"""The MFM corruption: mask a low- or a high-pass part of each image's spectrum."""

import math

import keras
import numpy as np
from keras import ops

from keras_mfm import frequency
from keras_mfm.backend import ReplicaSeedGenerator


def _number(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"`{name}` must be a number, got {value}.")
    return value


@keras.saving.register_keras_serializable(package="keras_mfm")
class FrequencyMasking(keras.layers.Layer):
    """Masks a centred disc (low-pass) or its complement (high-pass) of each image's spectrum.

    Per image, low-pass is drawn with probability `p_low` and high-pass otherwise; the kept-mask
    `M` (1 = kept) is the circle `|k| < r` or its complement, shared by the channels. The
    corrupted image is `clip(real(ifft2(ifftshift(fftshift(fft2(x)) * M))), 0, 1)` (float32 FFTs).

    Options of the authors' code (both off by default):

    - Band (`outer_radius` = r2, the authors' MASK_RADIUS2): the low-pass draw keeps
      `|k| < r1 or |k| >= r2` (band-stop), the high-pass draw the ring `r1 <= |k| < r2`
      (band-pass); see `frequency.band_mask`.
    - Random radius (`radius_range=(r_min, r_max)`): each image draws its r1 uniformly in
      `[r_min, r_max)`; its mask is computed on the fly, `|k| < r` per image.

    The corruption is the pre-training task, not an augmentation: it is applied in training and
    inference alike.

    Args:
        radius: mask radius r1 in frequency-index units. `None` scales the authors' 16 at 224
            (`16 / 224 * min(H, W)`, about 2.29 at 32x32), unless `radius_range` is given.
        p_low: probability of a low-pass mask (authors: 0.5 for ViT, 0.3 for ResNet-50).
        seed: int seed of the layer's `keras.random.SeedGenerator`.
        outer_radius: outer radius r2 of the band (frequency-index units at the actual image
            size), `None` = no band. Must be larger than r1 (than `r_max` with a `radius_range`);
            may exceed the spectrum (then it has no effect, like the authors' 999).
        radius_range: `(r_min, r_max)`, `0 < r_min < r_max <= max_radius`, a per-image random r1;
            exclusive with `radius`.

    Call arguments:
        images: `(B, H, W, C)` images in [0, 1].

    Returns:
        `(corrupted, mask)`: `(B, H, W, C)` corrupted images in [0, 1] and the `(B, H, W)` float32
        kept-mask of each image.
    """

    def __init__(self, radius=None, p_low=0.5, seed=None, outer_radius=None, radius_range=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(p_low) <= 1.0:
            raise ValueError(f"`p_low` must be a probability in [0, 1], got {p_low}.")
        if radius is not None:
            radius = float(radius)
            if radius <= 0:
                raise ValueError(f"`radius` must be > 0, got {radius}.")
        if radius_range is not None:
            if radius is not None:
                raise ValueError(
                    f"Give either a fixed `radius` ({radius}) or a random `radius_range` "
                    f"({radius_range}), not both."
                )
            if isinstance(radius_range, (str, bytes)) or not hasattr(radius_range, "__len__") or len(radius_range) != 2:
                raise ValueError(f"`radius_range` must be a pair (r_min, r_max), got {radius_range!r}.")
            r_min, r_max = (_number(r, "radius_range") for r in radius_range)
            if not 0.0 < r_min < r_max or math.isinf(r_max):
                raise ValueError(f"`radius_range` must satisfy 0 < r_min < r_max < inf, got {(r_min, r_max)}.")
            radius_range = (r_min, r_max)
        if outer_radius is not None:
            outer_radius = _number(outer_radius, "outer_radius")
            if radius is not None:
                frequency.check_outer_radius(radius, outer_radius)
            elif radius_range is not None:
                frequency.check_outer_radius(radius_range[1], outer_radius, "radius_range[1] (r_max)")
            elif outer_radius <= 0:
                raise ValueError(f"`outer_radius` must be larger than `radius` (> 0), got {outer_radius}.")
        self.radius = radius
        self.p_low = float(p_low)
        self.seed = seed
        self.outer_radius = outer_radius
        self.radius_range = radius_range
        self.seed_generator = ReplicaSeedGenerator(seed)  # distinct draws per tf.distribute replica
        self._low_pass_mask = None
        self._distance = None

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                "FrequencyMasking needs NHWC images with a static height and width, got shape "
                f"{tuple(input_shape)}."
            )
        size = (int(input_shape[1]), int(input_shape[2]))
        if self.radius_range is None:
            self._low_pass_mask = frequency.band_mask_numpy(
                size, self.effective_radius(size), self.outer_radius, low_pass=True
            )
        else:
            # every drawn r1 < r_max <= max_radius is a valid radius
            frequency.check_radius(size, self.radius_range[1], "radius_range")
            height, width = size
            rows = np.arange(height, dtype="float32") - height // 2
            cols = np.arange(width, dtype="float32") - width // 2
            self._distance = np.sqrt(rows[:, None] ** 2 + cols[None, :] ** 2).astype("float32")
        self.built = True

    def effective_radius(self, image_size):
        """The fixed r1 at `image_size` (`None` with a `radius_range`)."""
        if self.radius_range is not None:
            return None
        return self.radius if self.radius is not None else frequency.default_radius(image_size)

    def _random_low_pass_masks(self, batch):
        """`(B, H, W)` low-pass (or band-stop) masks, `|k| < r` with `r ~ U[r_min, r_max)` per image."""
        r_min, r_max = self.radius_range
        radii = keras.random.uniform(
            (batch,), minval=r_min, maxval=r_max, dtype="float32", seed=self.seed_generator
        )
        distance = ops.convert_to_tensor(self._distance, dtype="float32")[None]
        low = ops.cast(distance < radii[:, None, None], "float32")
        if self.outer_radius is not None:
            # r < r_max < r2: the disc and the outer part are disjoint
            low = low + ops.cast(distance >= self.outer_radius, "float32")
        return low

    def call(self, images):
        batch = ops.shape(images)[0]
        is_low = keras.random.uniform((batch,), seed=self.seed_generator) < self.p_low
        if self.radius_range is None:
            low = ops.convert_to_tensor(self._low_pass_mask, dtype="float32")[None]
        else:
            low = self._random_low_pass_masks(batch)
        mask = ops.where(is_low[:, None, None], low, 1.0 - low)
        corrupted = frequency.frequency_filter(images, mask)
        return ops.cast(corrupted, self.compute_dtype), mask

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), tuple(input_shape[:3])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "radius": self.radius,
                "p_low": self.p_low,
                "seed": self.seed,
                "outer_radius": self.outer_radius,
                "radius_range": None if self.radius_range is None else list(self.radius_range),
            }
        )
        return config
