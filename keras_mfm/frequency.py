"""Frequency-domain operations of Masked Frequency Modeling (SPEC.md section 1).

All functions take NHWC image batches, run their FFTs in float32 whatever the dtype policy (Keras'
complex ops need float32 inputs on every backend), and use only `keras.ops`, so they work on the
TensorFlow, JAX and PyTorch backends alike.

Conventions (the authors' code):

- Spectra are `fftshift`-ed, so the zero frequency sits at index `(H // 2, W // 2)`.
- A *kept-mask* `M` has `1` where a frequency is kept and `0` where it is masked.
- Low-pass keeps `|k| < r`; high-pass keeps `|k| >= r` (`1 - low-pass`), where `|k|` is the
  Euclidean distance of a (shifted) frequency index from the centre.
- Optional band (the authors' MASK_RADIUS1 = r1, MASK_RADIUS2 = r2): the "low-pass" draw keeps
  `|k| < r1 or |k| >= r2` (band-stop), the "high-pass" draw keeps the ring `r1 <= |k| < r2`
  (band-pass). Without r2 (the authors' 999) this is the plain circular low/high-pass.

Since `fftshift` is a permutation, `ifftshift(fftshift(F) * M) == F * ifftshift(M)`; the functions
below shift the (small, shared) mask instead of every spectrum, which is exact and cheaper.
"""

import math

import numpy as np
from keras import ops

#: Radius used by the authors at 224x224 (a fixed radius, scaled in proportion for other sizes).
REFERENCE_RADIUS = 16.0
REFERENCE_IMAGE_SIZE = 224.0


def _pair(size, name="size"):
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"`{name}` must be a positive int or a (height, width) pair, got {size}.")
    return size


def default_radius(image_size):
    """The authors' radius (16 at 224) scaled to `image_size`: `16 / 224 * min(H, W)`."""
    height, width = _pair(image_size, "image_size")
    return REFERENCE_RADIUS / REFERENCE_IMAGE_SIZE * min(height, width)


def max_radius(size):
    """Largest distance of any shifted frequency index from the centre `(H // 2, W // 2)`."""
    height, width = _pair(size)
    return math.hypot(height // 2, width // 2)


def _distance_from_centre(size):
    height, width = _pair(size)
    rows = np.arange(height, dtype=np.float64) - height // 2
    cols = np.arange(width, dtype=np.float64) - width // 2
    return np.sqrt(rows[:, None] ** 2 + cols[None, :] ** 2)


def check_radius(size, radius, name="radius"):
    """Raise a clear `ValueError` unless `0 < radius <= max_radius(size)`."""
    limit = max_radius(size)
    if not isinstance(radius, (int, float, np.floating, np.integer)) or not math.isfinite(radius):
        raise ValueError(f"`{name}` must be a finite number, got {radius!r}.")
    if radius <= 0:
        raise ValueError(f"`{name}` must be > 0, got {radius}.")
    if radius > limit:
        raise ValueError(
            f"`{name}`={radius} is larger than the spectrum of a {_pair(size)} image: the farthest "
            f"frequency lies {limit:.3f} from the centre, so a low-pass mask would keep everything "
            "and a high-pass mask nothing."
        )


def check_outer_radius(radius, outer_radius, radius_name="radius"):
    """Raise a clear `ValueError` unless `outer_radius` (r2) is a number larger than `radius` (r1).

    r2 may exceed `max_radius(size)`; the band then reaches past the spectrum and has no effect.
    """
    if not isinstance(outer_radius, (int, float, np.floating, np.integer)) or math.isnan(outer_radius):
        raise ValueError(f"`outer_radius` must be a number, got {outer_radius!r}.")
    if outer_radius <= radius:
        raise ValueError(
            f"`outer_radius`={outer_radius} must be larger than `{radius_name}`={radius}: the band "
            "r1 <= |k| < r2 would be empty."
        )


def circular_mask_numpy(size, radius, low_pass=True):
    """NumPy version of `circular_mask` (float32 array of shape `(H, W)`)."""
    check_radius(size, radius)
    low = (_distance_from_centre(size) < radius).astype("float32")
    return low if low_pass else 1.0 - low


def circular_mask(size, radius, low_pass=True):
    """Centred circular kept-mask of shape `(H, W)` (float32, `1` = kept).

    `M[i, j] = 1` if `sqrt((i - H//2)^2 + (j - W//2)^2) < radius` for low-pass, the complement for
    high-pass.

    Args:
        size: int or `(H, W)`.
        radius: mask radius in frequency-index units, `0 < radius <= max_radius(size)`.
        low_pass: keep the low frequencies (True) or the high ones (False).
    """
    return ops.convert_to_tensor(circular_mask_numpy(size, radius, low_pass), dtype="float32")


def band_mask_numpy(size, radius, outer_radius=None, low_pass=True):
    """NumPy version of `band_mask` (float32 array of shape `(H, W)`)."""
    if outer_radius is None:
        return circular_mask_numpy(size, radius, low_pass)
    check_radius(size, radius)
    check_outer_radius(radius, outer_radius)
    distance = _distance_from_centre(size)
    ring = ((distance >= radius) & (distance < outer_radius)).astype("float32")
    return 1.0 - ring if low_pass else ring


def band_mask(size, radius, outer_radius=None, low_pass=True):
    """The authors' band kept-mask of shape `(H, W)` (float32, `1` = kept).

    `M = 0` where `r1 <= |k| < r2` and `1` elsewhere (r1 = `radius`, r2 = `outer_radius`); the
    low-pass draw keeps `M` (band-stop), the high-pass draw keeps `1 - M` (the ring, band-pass).
    With `outer_radius=None` this is `circular_mask(size, radius, low_pass)`.

    Args:
        size: int or `(H, W)`.
        radius: inner radius r1, `0 < r1 <= max_radius(size)`.
        outer_radius: outer radius r2 > r1 or `None` (no band); may exceed `max_radius(size)`.
        low_pass: the low-pass draw (True) or the high-pass one (False).
    """
    return ops.convert_to_tensor(band_mask_numpy(size, radius, outer_radius, low_pass), dtype="float32")


def fftshift2d(x):
    """`fftshift` over the last two axes (zero frequency to index `(H // 2, W // 2)`)."""
    height, width = x.shape[-2], x.shape[-1]
    return ops.roll(ops.roll(x, height // 2, axis=-2), width // 2, axis=-1)


def ifftshift2d(x):
    """Inverse of `fftshift2d`."""
    height, width = x.shape[-2], x.shape[-1]
    return ops.roll(ops.roll(x, -(height // 2), axis=-2), -(width // 2), axis=-1)


def _check_images(images, name="images"):
    if len(images.shape) != 4:
        raise ValueError(
            f"`{name}` must be an NHWC batch of rank 4 (batch, height, width, channels), "
            f"got shape {tuple(images.shape)}."
        )


def _spectrum(images):
    """float32 NHWC images -> (real, imag) of the un-shifted 2-D FFT, each (B, C, H, W)."""
    x = ops.transpose(ops.cast(images, "float32"), (0, 3, 1, 2))
    return ops.fft2((x, ops.zeros_like(x)))


def _unshifted_mask(mask, height, width, name="mask"):
    """Kept-mask (H, W) or (B, H, W) -> float32, ifftshift-ed, broadcastable to (B, C, H, W)."""
    mask = ops.cast(ops.convert_to_tensor(mask), "float32")
    if len(mask.shape) not in (2, 3) or tuple(mask.shape[-2:]) != (height, width):
        raise ValueError(
            f"`{name}` must have shape (H, W) or (B, H, W) with (H, W) = {(height, width)}, "
            f"got {tuple(mask.shape)}."
        )
    mask = ifftshift2d(mask)
    if len(mask.shape) == 2:
        return mask[None, None, :, :]
    return mask[:, None, :, :]


def frequency_filter(images, mask):
    """Keep the frequencies selected by `mask`, back to pixels, clipped to [0, 1].

    `x_c = clip(real(ifft2(ifftshift(fftshift(fft2(x)) * M))), 0, 1)`, per channel, plain
    (un-normalised) FFT, computed in float32.

    Args:
        images: `(B, H, W, C)` images in [0, 1].
        mask: kept-mask `(H, W)` shared by the batch or `(B, H, W)` per image.

    Returns:
        `(B, H, W, C)` float32 filtered images.
    """
    _check_images(images)
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    weight = _unshifted_mask(mask, height, width)[:, 0]  # (1 or B, H, W)
    # The channel planes as one (B*C, H, W) stack (a per-image mask repeated per channel). Besides
    # being one batched FFT, this rank-3 layout is the one XLA's CPU FFT accepts when the batch is
    # sharded over devices (keras.distribution.DataParallel); (B, C, H, W) fails there.
    planes = ops.reshape(ops.transpose(ops.cast(images, "float32"), (0, 3, 1, 2)), (-1, height, width))
    if weight.shape[0] != 1:
        weight = ops.repeat(weight, channels, axis=0)
    real, imag = ops.fft2((planes, ops.zeros_like(planes)))
    filtered, _ = ops.ifft2((real * weight, imag * weight))
    filtered = ops.reshape(ops.clip(filtered, 0.0, 1.0), (-1, channels, height, width))
    return ops.transpose(filtered, (0, 2, 3, 1))


def _difference_spectrum(pred, target):
    """(real, imag) of `P - T`, orthonormal spectra, each `(B, C, H, W)`, un-shifted, float32."""
    _check_images(pred, "pred")
    _check_images(target, "target")
    if tuple(pred.shape[1:]) != tuple(target.shape[1:]):
        raise ValueError(
            f"`pred` and `target` must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}."
        )
    height, width = pred.shape[1], pred.shape[2]
    # The FFT is linear: fft2(pred) - fft2(target) == fft2(pred - target), one transform instead of two.
    diff = ops.cast(pred, "float32") - ops.cast(target, "float32")
    real, imag = _spectrum(diff)
    scale = 1.0 / math.sqrt(height * width)
    return real * scale, imag * scale


def _distance(real, imag, gamma):
    squared = real**2 + imag**2 + 1e-12
    if gamma == 1.0:
        return ops.sqrt(squared)
    return ops.power(squared, 0.5 * gamma)


def _focal_weights(real, imag, alpha, log, batch):
    real, imag = ops.stop_gradient(real), ops.stop_gradient(imag)
    weights = ops.sqrt(real**2 + imag**2)
    if alpha != 1.0:
        weights = ops.power(weights, alpha)
    if log:
        weights = ops.log1p(weights)
    if batch:
        peak = ops.max(weights)
    else:
        peak = ops.max(weights, axis=(2, 3), keepdims=True)
    # 0 / 0 (pred == target) would be NaN, which the authors set to 0: never divide by 0 instead.
    positive = peak > 0.0
    weights = ops.where(positive, weights / ops.where(positive, peak, 1.0), 0.0)
    weights = ops.where(ops.isnan(weights), 0.0, weights)
    return ops.stop_gradient(ops.clip(weights, 0.0, 1.0))


def frequency_distance(pred, target, gamma=1.0):
    """Per-frequency distance `|P - T| ** gamma` of orthonormal spectra, shape `(B, C, H, W)`.

    `d = sqrt((Re P - Re T)^2 + (Im P - Im T)^2 + 1e-12) ** gamma` with `P = fft2(pred) / sqrt(HW)`,
    `T = fft2(target) / sqrt(HW)`, float32, un-shifted frequency layout.
    """
    return _distance(*_difference_spectrum(pred, target), gamma)


def focal_weights(pred, target, alpha=1.0, log=False, batch=False):
    """Spectrum weight matrix of the focal frequency loss (Jiang et al. 2021), `(B, C, H, W)`.

    On the orthonormal spectra `P`, `T` (same un-shifted layout as `frequency_distance`):
    `w = |P - T| ** alpha` (no epsilon); `w = log(w + 1)` if `log`; `w = w / max(w)` over the whole
    batch if `batch`, else over `(H, W)` per image and channel; NaN (0 / 0) -> 0; clip to [0, 1].
    The weights are constants for the gradient (`stop_gradient`).

    Args:
        pred, target: `(B, H, W, C)` images.
        alpha: exponent of the spectrum distance (the authors' `alpha`, 1).
        log: the authors' `log_matrix`.
        batch: the authors' `batch_matrix`.
    """
    return _focal_weights(*_difference_spectrum(pred, target), alpha, log, batch)


def frequency_loss(
    pred, target, mask=None, gamma=1.0, focal=False, focal_alpha=1.0, focal_log=False, focal_batch=False
):
    """MFM's frequency loss (SPEC.md section 1), a float32 scalar.

    With a kept-mask `M` (the corruption's mask), the distance is averaged over the *masked*
    frequencies only, over all channels and images:
    `loss = sum(d * (1 - M)) / (sum(1 - M) * C)`.
    Without a mask, it is the mean over the full spectrum (restoration baselines, or the paper's
    ablation). With `focal`, `d` is replaced by `w * d`, `w = focal_weights(...)` (the focal
    frequency loss' spectrum weight matrix, a constant for the gradient); the denominator is
    unchanged.

    Args:
        pred: `(B, H, W, C)` predicted images (normalised space).
        target: `(B, H, W, C)` target images (normalised space).
        mask: optional kept-mask `(H, W)` or `(B, H, W)` (1 = kept, i.e. not scored).
        gamma: exponent of the distance (1 in every released config).
        focal: weight the distance with the focal spectrum weight matrix (off in every released
            config).
        focal_alpha, focal_log, focal_batch: `alpha`, `log` and `batch` of `focal_weights`.
    """
    real, imag = _difference_spectrum(pred, target)
    distance = _distance(real, imag, gamma)
    if focal:
        distance = distance * _focal_weights(real, imag, focal_alpha, focal_log, focal_batch)
    if mask is None:
        return ops.mean(distance)
    height, width = pred.shape[1], pred.shape[2]
    masked = 1.0 - _unshifted_mask(mask, height, width)
    masked = ops.broadcast_to(masked, (ops.shape(distance)[0], 1, height, width))
    channels = distance.shape[1]
    denominator = ops.maximum(ops.sum(masked) * channels, 1e-12)
    return ops.sum(distance * masked) / denominator
