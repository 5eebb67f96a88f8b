"""The image-restoration corruptions of MFM's baselines (SPEC.md, "Restoration baselines").

The MFM paper compares its frequency masking with three classic low-level corruptions, each one
a different loss of spectral information: super-resolution (SR) removes the high frequencies,
deblurring attenuates them and denoising adds energy at every frequency. Each layer maps images
`x` of shape `(B, H, W, C)` in [0, 1] to `(corrupted, kept_mask)` like `FrequencyMasking`.

Formulas and the authors' parameters at 224x224, and how they scale with the image size
(`S = min(H, W)`):

- SR (`Downsampling`): `down = clip(resize_bicubic(x, (H // f, W // f)))`,
  `up = clip(resize_bicubic(down, (H, W)))`, `clip` to [0, 1], `f = 8`. Both resizes use
  `keras.ops.image.resize(..., interpolation="bicubic", antialias=False)` in float32. The factor is
  dimensionless (the same relative cut-off, `1 / (2 f)` cycles per pixel, at every size), so it
  stays 8 at any size; it must be an int >= 2 that divides H and W. Deterministic.
  Note: Keras' bicubic kernel is the backend's own: Keys' cubic with `a = -0.5` on TensorFlow and
  JAX, `a = -0.75` on PyTorch (`torch.nn.functional.interpolate`), and the backends treat the
  borders differently, so the SR outputs differ slightly between backends.
- Deblur (`GaussianBlur`): `x * g_k (H) * g_k (W)` per channel, a separable isotropic Gaussian
  `g_k[d] ~ exp(-d^2 / (2 sigma^2))` for `d = -(k // 2) .. k // 2`, truncated to the `k x k`
  window and normalised to sum 1, with reflect padding without repeating the edge (OpenCV's
  BORDER_REFLECT_101, NumPy's pad mode "reflect": `d c b | a b c d | c b a`). The kernel size `k`
  is drawn uniformly per image from the allowed odd sizes. At 224: `sigma = 5`,
  `k in {7, 9, ..., 21}`. Scaled (when `sigma` / `kernel_sizes` are None):
  `sigma = 5 * S / 224` and `k` = the odd integers in
  `[round_to_odd(7 * S / 224), round_to_odd(21 * S / 224)]`, at least 3 (`round_to_odd(v)` is the
  nearest odd integer, halves rounded up); at 32x32: `sigma = 0.714`, `k in {3}`. The per-image
  kernels are zero-padded to the largest size (the same filters) and applied in one batched
  computation; the result is clipped to [0, 1] (a no-op up to rounding: a convex combination).
- Denoise (`AdditiveNoise`): `x + sigma * n`, `n ~ N(0, 1)` i.i.d. per pixel and channel,
  `sigma = 75 / 255` at every size (an intensity, not a spatial parameter). Not clipped, as in the
  authors' code; `clip=True` clips to [0, 1].

The kept-mask is a `(B, H, W)` float32 array of zeros: no frequency is kept intact, so the loss
scores the whole spectrum. With `keras_mfm.frequency.frequency_loss(pred, target, mask)` a zero
kept-mask gives exactly the full-spectrum mean, so these layers drop into
`keras_mfm.models.MFM(encoder, corruption=layer)` unchanged (the paper's restoration baselines: same
model and loss, another corruption, the loss over the full spectrum).

Like `FrequencyMasking`, the corruptions are the pre-training task, not augmentations: they are
applied in training and inference alike.
"""

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_mfm.backend import ReplicaSeedGenerator

#: The authors' image size, at which the parameters below are given.
REFERENCE_IMAGE_SIZE = 224
#: SR down-sampling factor (dimensionless, the same at every size).
DEFAULT_FACTOR = 8
#: Deblur sigma and kernel-size range at 224x224.
REFERENCE_BLUR_SIGMA = 5.0
REFERENCE_KERNEL_RANGE = (7, 21)
MIN_KERNEL_SIZE = 3
#: Denoise noise standard deviation (intensity, not scaled).
DEFAULT_NOISE_SIGMA = 75.0 / 255.0


def _pair(size, name="image_size"):
    if isinstance(size, numbers.Integral):
        size = (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"`{name}` must be a positive int or a (height, width) pair, got {size}.")
    return size


def _positive_number(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    if value <= 0:
        raise ValueError(f"`{name}` must be > 0, got {value}.")
    return float(value)


def round_to_odd(value):
    """Nearest odd integer to `value` (halves rounded up): 7 -> 7, 1.5 -> 1, 2 -> 3."""
    return 2 * int(math.floor((value - 1.0) / 2.0 + 0.5)) + 1


def truncated_gaussian_kernel(sigma, size):
    """1-D Gaussian `exp(-d^2 / (2 sigma^2))`, `d = -(size // 2) .. size // 2`, sum 1 (float64)."""
    offsets = np.arange(size, dtype=np.float64) - size // 2
    kernel = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


class RestorationCorruption(keras.layers.Layer):
    """Base of the restoration corruptions: `(B, H, W, C)` -> `(corrupted, kept_mask)`.

    Checks at build time that the input is an NHWC batch with a static height and width.
    Subclasses implement `corrupt(images)` on float32 images; `call` casts the result to the
    layer's compute dtype and returns it with a `(B, H, W)` float32 kept-mask of zeros (nothing
    kept: the loss scores the full spectrum).
    """

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 4 or input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                f"{type(self).__name__} needs NHWC images (batch, height, width, channels) with a "
                f"static height and width, got shape {input_shape}."
            )
        self.image_size = (int(input_shape[1]), int(input_shape[2]))
        self._check_image_size(self.image_size)
        self.built = True

    def _check_image_size(self, image_size):
        """Subclass hook: raise a ValueError if the layer cannot handle `image_size`."""

    def corrupt(self, images):
        raise NotImplementedError

    def call(self, images):
        images = ops.cast(images, "float32")
        if len(images.shape) != 4:
            raise ValueError(
                f"{type(self).__name__} needs NHWC images of rank 4, got shape {tuple(images.shape)}."
            )
        corrupted = self.corrupt(images)
        kept_mask = ops.zeros_like(images[..., 0])
        return ops.cast(corrupted, self.compute_dtype), kept_mask

    def compute_output_shape(self, input_shape):
        return tuple(input_shape), tuple(input_shape[:3])


@keras.saving.register_keras_serializable(package="keras_mfm")
class Downsampling(RestorationCorruption):
    """SR corruption: bicubic down-sampling by `factor` then up-sampling back, both clipped.

    `clip(resize(clip(resize(x, (H // f, W // f))), (H, W)))`, bicubic, no antialiasing, float32.

    Args:
        factor: int >= 2 dividing H and W (authors: 8 at 224; dimensionless, not scaled).

    Call arguments:
        images: `(B, H, W, C)` images in [0, 1].

    Returns:
        `(corrupted, kept_mask)`: `(B, H, W, C)` images in [0, 1] and `(B, H, W)` float32 zeros.
    """

    def __init__(self, factor=DEFAULT_FACTOR, **kwargs):
        super().__init__(**kwargs)
        if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor < 2:
            raise ValueError(
                f"`factor` must be an int >= 2 (factor=1 would be the identity), got {factor!r}."
            )
        self.factor = int(factor)

    def _check_image_size(self, image_size):
        height, width = image_size
        if height % self.factor or width % self.factor:
            raise ValueError(
                f"`factor`={self.factor} must divide the image height and width, got "
                f"(height, width) = {image_size}."
            )

    def corrupt(self, images):
        height, width = images.shape[1], images.shape[2]
        self._check_image_size((height, width))
        resize = lambda x, size: ops.image.resize(  # noqa: E731
            x, size, interpolation="bicubic", antialias=False, data_format="channels_last"
        )
        down = ops.clip(resize(images, (height // self.factor, width // self.factor)), 0.0, 1.0)
        return ops.clip(resize(down, (height, width)), 0.0, 1.0)

    def get_config(self):
        config = super().get_config()
        config.update({"factor": self.factor})
        return config


@keras.saving.register_keras_serializable(package="keras_mfm")
class GaussianBlur(RestorationCorruption):
    """Deblur corruption: isotropic Gaussian blur with a random kernel size per image.

    Per image a size `k` is drawn uniformly from the allowed odd sizes; the image is convolved per
    channel along H then W with the truncated, normalised Gaussian `g_k` of standard deviation
    `sigma` (reflect padding, edge not repeated), then clipped to [0, 1].

    Args:
        sigma: standard deviation in pixels; None scales the authors' 5 at 224 (`5 * S / 224`,
            `S = min(H, W)`).
        kernel_sizes: tuple of odd ints >= 1; None = the odd sizes in
            `[round_to_odd(7 S / 224), round_to_odd(21 S / 224)]`, at least 3 (7..21 at 224).
        seed: int seed of the layer's `keras.random.SeedGenerator`.

    Call arguments:
        images: `(B, H, W, C)` images in [0, 1].

    Returns:
        `(corrupted, kept_mask)`: `(B, H, W, C)` blurred images and `(B, H, W)` float32 zeros.
    """

    def __init__(self, sigma=None, kernel_sizes=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        if sigma is not None:
            sigma = _positive_number(sigma, "sigma")
        if kernel_sizes is not None:
            if isinstance(kernel_sizes, numbers.Integral):
                kernel_sizes = (kernel_sizes,)
            kernel_sizes = tuple(kernel_sizes)
            if not kernel_sizes:
                raise ValueError("`kernel_sizes` must not be empty.")
            for size in kernel_sizes:
                if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1 or size % 2 == 0:
                    raise ValueError(
                        f"`kernel_sizes` must be odd ints >= 1, got {size!r} in {kernel_sizes}."
                    )
            kernel_sizes = tuple(sorted({int(size) for size in kernel_sizes}))
        self.sigma = sigma
        self.kernel_sizes = kernel_sizes
        self.seed = seed
        self.seed_generator = ReplicaSeedGenerator(seed)  # distinct draws per tf.distribute replica

    def effective_parameters(self, image_size):
        """`(sigma, kernel_sizes)` used for images of `image_size` (int or `(H, W)`)."""
        side = min(_pair(image_size))
        scale = side / REFERENCE_IMAGE_SIZE
        sigma = self.sigma if self.sigma is not None else REFERENCE_BLUR_SIGMA * scale
        if self.kernel_sizes is not None:
            return sigma, self.kernel_sizes
        low = max(MIN_KERNEL_SIZE, round_to_odd(REFERENCE_KERNEL_RANGE[0] * scale))
        high = max(MIN_KERNEL_SIZE, round_to_odd(REFERENCE_KERNEL_RANGE[1] * scale))
        return sigma, tuple(range(low, high + 1, 2))

    def kernel_table(self, image_size):
        """`(n_sizes, k_max)` float32 table: each allowed kernel zero-padded to the largest size."""
        sigma, sizes = self.effective_parameters(image_size)
        k_max = max(sizes)
        table = np.zeros((len(sizes), k_max), dtype=np.float64)
        for row, size in enumerate(sizes):
            start = (k_max - size) // 2
            table[row, start : start + size] = truncated_gaussian_kernel(sigma, size)
        return table.astype("float32")

    @staticmethod
    def _blur_axis(images, weights, axis):
        """Per-image 1-D convolution along `axis` (1 or 2); `weights` `(B or 1, k)`, reflect padding."""
        length = images.shape[axis]
        k = weights.shape[1]
        radius = k // 2
        # np.pad's "reflect" reflects repeatedly, so any radius works, even one >= the length.
        indices = np.pad(np.arange(length), radius, mode="reflect")
        padded = ops.take(images, ops.convert_to_tensor(indices, dtype="int32"), axis=axis)
        out = 0.0
        for offset in range(k):
            if axis == 1:
                window = padded[:, offset : offset + length]
            else:
                window = padded[:, :, offset : offset + length]
            out = out + weights[:, offset][:, None, None, None] * window
        return out

    def corrupt(self, images):
        table = self.kernel_table((images.shape[1], images.shape[2]))
        if table.shape[0] == 1:  # one size: no draw, a (1, k) table broadcasts over the batch
            weights = ops.convert_to_tensor(table, dtype="float32")
        else:
            choice = keras.random.randint(
                (ops.shape(images)[0],), 0, table.shape[0], seed=self.seed_generator
            )
            weights = ops.take(ops.convert_to_tensor(table, dtype="float32"), choice, axis=0)
        blurred = self._blur_axis(self._blur_axis(images, weights, axis=1), weights, axis=2)
        return ops.clip(blurred, 0.0, 1.0)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sigma": self.sigma,
                "kernel_sizes": None if self.kernel_sizes is None else list(self.kernel_sizes),
                "seed": self.seed,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_mfm")
class AdditiveNoise(RestorationCorruption):
    """Denoise corruption: additive white Gaussian noise `x + sigma * N(0, 1)`, not clipped.

    Args:
        sigma: noise standard deviation (authors: 75 / 255; not scaled with the image size).
        clip: clip the result to [0, 1] (the authors do not).
        seed: int seed of the layer's `keras.random.SeedGenerator`.

    Call arguments:
        images: `(B, H, W, C)` images in [0, 1].

    Returns:
        `(corrupted, kept_mask)`: `(B, H, W, C)` noisy images and `(B, H, W)` float32 zeros.
    """

    def __init__(self, sigma=DEFAULT_NOISE_SIGMA, clip=False, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.sigma = _positive_number(sigma, "sigma")
        self.clip = bool(clip)
        self.seed = seed
        self.seed_generator = ReplicaSeedGenerator(seed)  # distinct draws per tf.distribute replica

    def corrupt(self, images):
        noise = keras.random.normal(ops.shape(images), dtype="float32", seed=self.seed_generator)
        noisy = images + self.sigma * noise
        return ops.clip(noisy, 0.0, 1.0) if self.clip else noisy

    def get_config(self):
        config = super().get_config()
        config.update({"sigma": self.sigma, "clip": self.clip, "seed": self.seed})
        return config


#: Restoration task name -> corruption layer class.
RESTORATIONS = {"sr": Downsampling, "deblur": GaussianBlur, "denoise": AdditiveNoise}
