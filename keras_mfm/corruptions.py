"""Common image corruptions for robustness evaluation (CIFAR-10-C style).

Every function takes a batch of NHWC float images `x` of shape `(B, H, W, C)` in [0, 1] (a NumPy
array or a backend tensor) and returns float32 images of the same shape, clipped to [0, 1]. All
but `jpeg` use only `keras.ops` / `keras.random` and return backend tensors; `jpeg` round-trips
through Pillow and returns a NumPy float32 array.

Formulas (`clip` = clip to [0, 1]):

- gaussian_noise: `clip(x + sigma * n)`, `n ~ N(0, 1)` i.i.d. per pixel and channel.
- gaussian_blur: `clip(x * g_H * g_W)`, a separable isotropic Gaussian of standard deviation
  `sigma` per channel, kernel `g[k] ~ exp(-k^2 / (2 sigma^2))` for `|k| <= ceil(3 sigma)`,
  normalised to sum 1, with reflect padding (`d c b | a b c d | c b a`, edge not repeated).
- jpeg: `decode(encode_JPEG(round(255 x), quality)) / 255` with Pillow, image by image.
- contrast: `clip((x - m) * factor + m)`, `m` the mean of each image over H, W and C.
- low_pass: `clip(real(ifft2(ifftshift(fftshift(fft2(x)) * M_r))))`, per channel, with
  `M_r[k] = 1` if `|k| < r` (the convention of `frequency.circular_mask`: the distance of a shifted
  frequency index from the centre `(H // 2, W // 2)`, strict inequality).
- high_pass: the same with the kept-mask `1 - M_r`, except that the zero frequency is kept, i.e.
  `clip(x - low_pass_unclipped(x) + mean_c(x))` with `mean_c` each image's per-channel mean, so
  the brightness is preserved.

Severities (`CORRUPTIONS`, five levels, given for 32x32 images). Noise, blur, JPEG and contrast are
CIFAR-10-C's (Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019, `make_cifar_c.py`); the blur sigma is scaled by
`min(H, W) / 32` for other sizes. The low-/high-pass radii are this project's choice, given as
fractions of `min(H, W)`: low-pass keeps less (more severe) as the radius shrinks, high-pass removes
more as it grows (at 32x32, radius 1.28 to 5.6: severity 1 removes the 4 lowest non-zero
frequencies).
"""

import io
import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_mfm import frequency

REFERENCE_SIZE = 32
SEVERITIES = (1, 2, 3, 4, 5)


def _as_images(images):
    """Any NHWC batch -> float32 backend tensor, checking the rank."""
    images = ops.convert_to_tensor(images, dtype="float32")
    if len(images.shape) != 4:
        raise ValueError(
            "`images` must be an NHWC batch of rank 4 (batch, height, width, channels), "
            f"got shape {tuple(images.shape)}."
        )
    return images


def _check_number(value, name, minimum=0.0):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def gaussian_noise(images, sigma, seed=None):
    """Additive white Gaussian noise: `clip(x + sigma * N(0, 1))`.

    Args:
        images: `(B, H, W, C)` images in [0, 1].
        sigma: noise standard deviation (>= 0).
        seed: None, an int or a `keras.random.SeedGenerator` (passed to `keras.random.normal`).

    Returns:
        `(B, H, W, C)` float32 tensor.
    """
    _check_number(sigma, "sigma")
    images = _as_images(images)
    noise = keras.random.normal(ops.shape(images), dtype="float32", seed=seed)
    return ops.clip(images + sigma * noise, 0.0, 1.0)


def gaussian_kernel(sigma):
    """Normalised 1-D Gaussian kernel of radius `ceil(3 sigma)` (NumPy float64, size `2r + 1`)."""
    radius = int(math.ceil(3.0 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def _blur_axis(images, kernel, axis):
    """1-D convolution of `images` along `axis` (1 or 2), reflect padding, shifted-slice sums."""
    length = images.shape[axis]
    radius = len(kernel) // 2
    # Reflected source indices for the padded axis (NumPy's "reflect": edge not repeated; np.pad
    # reflects repeatedly, so any radius works, even one larger than the image).
    indices = np.pad(np.arange(length), radius, mode="reflect")
    padded = ops.take(images, ops.convert_to_tensor(indices, dtype="int32"), axis=axis)
    out = 0.0
    for offset, weight in enumerate(kernel):
        if axis == 1:
            window = padded[:, offset : offset + length]
        else:
            window = padded[:, :, offset : offset + length]
        out = out + float(weight) * window
    return out


def gaussian_blur(images, sigma):
    """Separable isotropic Gaussian blur, per channel, with reflect padding.

    Kernel `g[k] ~ exp(-k^2 / (2 sigma^2))`, `|k| <= ceil(3 sigma)`, normalised to sum 1, applied
    along H then W. `sigma <= 0` returns the images unchanged (as float32).

    Args:
        images: `(B, H, W, C)` images in [0, 1].
        sigma: standard deviation in pixels.

    Returns:
        `(B, H, W, C)` float32 tensor.
    """
    _check_number(sigma, "sigma", minimum=-math.inf)
    images = _as_images(images)
    if sigma <= 0:
        return images
    kernel = gaussian_kernel(sigma)
    blurred = _blur_axis(_blur_axis(images, kernel, axis=1), kernel, axis=2)
    return ops.clip(blurred, 0.0, 1.0)


def jpeg(images, quality):
    """JPEG round trip with Pillow at `quality` (int, 1..95), image by image.

    The images are quantised to uint8 (`round(255 x)`), encoded with Pillow's defaults at
    `quality`, decoded and divided by 255. `C` must be 1 (grey) or 3 (RGB).

    Args:
        images: `(B, H, W, C)` images in [0, 1].
        quality: JPEG quality, int in 1..95.

    Returns:
        `(B, H, W, C)` **NumPy** float32 array in [0, 1].
    """
    from PIL import Image

    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) or not 1 <= quality <= 95:
        raise ValueError(f"`quality` must be an int in 1..95, got {quality!r}.")
    array = np.asarray(ops.convert_to_numpy(_as_images(images)), dtype=np.float32)
    channels = array.shape[-1]
    if channels not in (1, 3):
        raise ValueError(f"JPEG needs 1 or 3 channels, got {channels}.")
    pixels = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    out = np.empty_like(array)
    for index, image in enumerate(pixels):
        picture = Image.fromarray(image[..., 0], "L") if channels == 1 else Image.fromarray(image, "RGB")
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32)
        out[index] = decoded.reshape(image.shape) / 255.0
    return np.clip(out, 0.0, 1.0)


def contrast(images, factor):
    """Contrast change around each image's mean: `clip((x - m) * factor + m)`.

    `m` is the mean of each image over H, W and C (shape `(B, 1, 1, 1)`), as in CIFAR-10-C.

    Args:
        images: `(B, H, W, C)` images in [0, 1].
        factor: contrast factor (< 1 reduces contrast).

    Returns:
        `(B, H, W, C)` float32 tensor.
    """
    _check_number(factor, "factor")
    images = _as_images(images)
    mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
    return ops.clip((images - mean) * factor + mean, 0.0, 1.0)


def _low_frequency_mask(height, width, radius):
    """`(H, W)` float32 mask, 1 where the centred frequency distance is `< radius`.

    Same convention as `frequency.circular_mask`; a radius beyond the farthest frequency keeps all.
    """
    _check_number(radius, "radius")
    if radius == 0:
        raise ValueError("`radius` must be > 0, got 0.")
    if radius > frequency.max_radius((height, width)):
        return np.ones((height, width), dtype=np.float32)
    return frequency.circular_mask_numpy((height, width), radius, low_pass=True)


def low_pass(images, radius):
    """Keep the frequencies within `radius` of the centre (DC), back to pixels, clipped.

    `clip(real(ifft2(ifftshift(fftshift(fft2(x)) * M))))` per channel, with `M[k] = 1` if
    `|k| < radius` (`frequency.circular_mask`'s strict convention, `|k|` the distance from
    `(H // 2, W // 2)` of the shifted spectrum). A radius larger than the farthest frequency keeps
    everything (identity up to float32 rounding).

    Args:
        images: `(B, H, W, C)` images in [0, 1].
        radius: > 0, in frequency-index units.

    Returns:
        `(B, H, W, C)` float32 tensor.
    """
    images = _as_images(images)
    mask = _low_frequency_mask(images.shape[1], images.shape[2], radius)
    return frequency.frequency_filter(images, mask)


def high_pass(images, radius):
    """Remove the frequencies within `radius` of the centre but keep the DC term, clipped.

    Kept-mask `1 - M` with `M[k] = 1` if `|k| < radius` (as in `low_pass`), except that the zero
    frequency is kept: `clip(x - low_pass_unclipped(x) + mean_c(x))`, `mean_c` each image's
    per-channel mean over H and W, so the brightness is preserved. If `radius <= 1` only the zero
    frequency would be removed, so the images come back unchanged.

    Args:
        images: `(B, H, W, C)` images in [0, 1].
        radius: > 0, in frequency-index units.

    Returns:
        `(B, H, W, C)` float32 tensor.
    """
    images = _as_images(images)
    height, width = images.shape[1], images.shape[2]
    mask = 1.0 - _low_frequency_mask(height, width, radius)
    mask[height // 2, width // 2] = 1.0
    return frequency.frequency_filter(images, mask)


#: name -> (function, severity parameters 1..5 for 32x32 images); see the module docstring.
CORRUPTIONS = {
    "gaussian_noise": (gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10)),
    "gaussian_blur": (gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0)),
    "jpeg": (jpeg, (80, 65, 58, 50, 40)),
    "contrast": (contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    "low_pass": (low_pass, (0.35, 0.25, 0.175, 0.125, 0.0875)),
    "high_pass": (high_pass, (0.04, 0.06, 0.09, 0.125, 0.175)),
}

#: How each registry parameter scales with `min(H, W)`: by `min(H, W) / 32`, by `min(H, W)` (radius
#: fractions), or not at all.
_SCALE = {
    "gaussian_blur": lambda side: side / REFERENCE_SIZE,
    "low_pass": lambda side: side,
    "high_pass": lambda side: side,
}


def _check_name(name):
    if name not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption {name!r}; choose one of {sorted(CORRUPTIONS)}.")


def _check_severity(severity):
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or severity not in SEVERITIES:
        raise ValueError(f"`severity` must be an int in 1..5, got {severity!r}.")


def corruption_parameter(name, severity, image_size):
    """The parameter `corrupt` passes to corruption `name` at `severity` for `image_size`.

    Args:
        name: a key of `CORRUPTIONS`.
        severity: int in 1..5.
        image_size: int or `(H, W)`; size-dependent parameters scale with `min(H, W)`.

    Returns:
        sigma (noise, blur), quality (jpeg, int), factor (contrast) or radius (low/high pass).
    """
    _check_name(name)
    _check_severity(severity)
    if isinstance(image_size, numbers.Integral):
        image_size = (image_size, image_size)
    height, width = (int(side) for side in image_size)
    value = CORRUPTIONS[name][1][int(severity) - 1]
    if name in _SCALE:
        value = value * _SCALE[name](min(height, width))
    return value


def corrupt(images, name, severity, seed=None):
    """Apply corruption `name` at `severity` (1..5) to a `(B, H, W, C)` batch in [0, 1].

    `seed` (int or `keras.random.SeedGenerator`) is used by `gaussian_noise` only. Returns a
    float32 `(B, H, W, C)` backend tensor (a NumPy array for `jpeg`).
    """
    _check_name(name)
    _check_severity(severity)
    images = _as_images(images)
    parameter = corruption_parameter(name, severity, (images.shape[1], images.shape[2]))
    function = CORRUPTIONS[name][0]
    if function is gaussian_noise:
        return gaussian_noise(images, parameter, seed=seed)
    return function(images, parameter)
