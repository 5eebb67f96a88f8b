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


def frequency_filter(images, masks):
    """images (B, H, W, C) float64; masks (B, H, W) kept-masks."""
    out = np.empty_like(images)
    for b in range(images.shape[0]):
        for c in range(images.shape[3]):
            spectrum = np.fft.fftshift(np.fft.fft2(images[b, :, :, c]))
            back = np.fft.ifft2(np.fft.ifftshift(spectrum * masks[b]))
            out[b, :, :, c] = np.clip(back.real, 0.0, 1.0)
    return out


def frequency_loss(pred, target, masks=None, gamma=1.0):
    """pred, target (B, H, W, C); masks (B, H, W) kept-masks or None (full spectrum)."""
    total, count = 0.0, 0.0
    channels = pred.shape[3]
    distances = []
    for b in range(pred.shape[0]):
        for c in range(channels):
            p = np.fft.fftshift(np.fft.fft2(pred[b, :, :, c], norm="ortho"))
            t = np.fft.fftshift(np.fft.fft2(target[b, :, :, c], norm="ortho"))
            d = np.sqrt((p.real - t.real) ** 2 + (p.imag - t.imag) ** 2 + 1e-12) ** gamma
            distances.append(d)
            if masks is not None:
                total += np.sum(d * (1.0 - masks[b]))
        if masks is not None:
            count += np.sum(1.0 - masks[b]) * channels
    if masks is None:
        return float(np.mean(distances))
    return float(total / count)
