"""Independent NumPy implementations of SPEC.md's formulas (the references the tests hold us to).

Written directly from the text, with np.fft and explicit fftshift, not from keras_mfm's code.
"""

import numpy as np


def circular_mask(height, width, radius, low_pass=True):
    mask = np.zeros((height, width), dtype=np.float64)
    cy, cx = height // 2, width // 2
    for i in range(height):
        for j in range(width):
            if (i - cy) ** 2 + (j - cx) ** 2 < radius**2:
                mask[i, j] = 1.0
    return mask if low_pass else 1.0 - mask


def band_mask(height, width, r1, r2, low_pass=True):
    """The authors' band: M = 0 where r1^2 <= d^2 < r2^2, 1 elsewhere; the high-pass draw is 1 - M."""
    mask = np.ones((height, width), dtype=np.float64)
    cy, cx = height // 2, width // 2
    for i in range(height):
        for j in range(width):
            d2 = (i - cy) ** 2 + (j - cx) ** 2
            if r1**2 <= d2 < r2**2:
                mask[i, j] = 0.0
    return mask if low_pass else 1.0 - mask


def radii_in_range(height, width, r_min, r_max):
    """One radius for each distinct disc {d < r}, r in [r_min, r_max).

    The disc only changes when r passes a distance d: it is {d' < r_min}, or {d' <= d} for each
    distance r_min <= d < r_max (reached by any r in (d, r_max)).
    """
    cy, cx = height // 2, width // 2
    distances = sorted({np.sqrt((i - cy) ** 2 + (j - cx) ** 2) for i in range(height) for j in range(width)})
    return [r_min] + [d + 1e-9 for d in distances if r_min <= d < r_max]


def circular_masks_in_range(height, width, r_min, r_max):
    """Every distinct low-pass mask {d < r} for a radius r in [r_min, r_max)."""
    return [circular_mask(height, width, r) for r in radii_in_range(height, width, r_min, r_max)]


def frequency_filter(images, masks):
    """images (B, H, W, C) float64; masks (B, H, W) kept-masks."""
    out = np.empty_like(images)
    for b in range(images.shape[0]):
        for c in range(images.shape[3]):
            spectrum = np.fft.fftshift(np.fft.fft2(images[b, :, :, c]))
            back = np.fft.ifft2(np.fft.ifftshift(spectrum * masks[b]))
            out[b, :, :, c] = np.clip(back.real, 0.0, 1.0)
    return out


def focal_weights(pred, target, alpha=1.0, log=False, batch=False):
    """Focal frequency loss' spectrum weight matrix, (B, C, H, W), fftshift-ed layout.

    w = |P - T| ** alpha (orthonormal spectra, no epsilon); log(w + 1) if log; divided by its max over
    everything (batch) or over (H, W) per image and channel; NaN -> 0; clipped to [0, 1].
    """
    batch_size, _, _, channels = pred.shape
    w = np.zeros((batch_size, channels) + pred.shape[1:3])
    for b in range(batch_size):
        for c in range(channels):
            p = np.fft.fftshift(np.fft.fft2(pred[b, :, :, c], norm="ortho"))
            t = np.fft.fftshift(np.fft.fft2(target[b, :, :, c], norm="ortho"))
            w[b, c] = np.sqrt((p.real - t.real) ** 2 + (p.imag - t.imag) ** 2) ** alpha
    if log:
        w = np.log(w + 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        if batch:
            w = w / w.max()
        else:
            w = w / w.max(axis=(2, 3), keepdims=True)
    w[np.isnan(w)] = 0.0
    return np.clip(w, 0.0, 1.0)


def frequency_loss(pred, target, masks=None, gamma=1.0, focal=False, alpha=1.0, log=False, batch=False):
    """pred, target (B, H, W, C); masks (B, H, W) kept-masks or None (full spectrum).

    With focal, each distance is multiplied by focal_weights(...) (the denominator is unchanged).
    """
    total, count = 0.0, 0.0
    channels = pred.shape[3]
    distances = []
    weights = focal_weights(pred, target, alpha, log, batch) if focal else None
    for b in range(pred.shape[0]):
        for c in range(channels):
            p = np.fft.fftshift(np.fft.fft2(pred[b, :, :, c], norm="ortho"))
            t = np.fft.fftshift(np.fft.fft2(target[b, :, :, c], norm="ortho"))
            d = np.sqrt((p.real - t.real) ** 2 + (p.imag - t.imag) ** 2 + 1e-12) ** gamma
            if focal:
                d = d * weights[b, c]
            distances.append(d)
            if masks is not None:
                total += np.sum(d * (1.0 - masks[b]))
        if masks is not None:
            count += np.sum(1.0 - masks[b]) * channels
    if masks is None:
        return float(np.mean(distances))
    return float(total / count)
