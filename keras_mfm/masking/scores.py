"""Token importance for AMT and FAMT (SPEC.md s. 2).

Importance (one value per patch and image, from the last encoder block in inference mode, on all
tokens; `A` is that block's softmax attention `(heads, 1 + N, 1 + N)` with [CLS] first, `X` its
`(N, C)` patch-token features, `i`, `j` index patch tokens `1..N`, `h` heads):

- AMT (`amt_importance`): per head the [CLS] row over the patches, min-max normalised over the
  patches, averaged over the heads:
  `a_j = mean_h (A_h[0, j] - min_k A_h[0, k]) / (max_k A_h[0, k] - min_k A_h[0, k] + eps)`.
- FAMT attention score (`famt_attention_score`, the authors' code):
  `s_j = mean_h( A_h[0, j] * mean_i A_h[i, 0] ) + mean_h( mean_i A_h[i, j] * A_h[0, 0] )`.
- FAMT frequency term (`low_frequency_energy`): 1-D orthonormal FFT of `X` along the token axis per
  channel, times the real kernel `g_k = 1 - exp(-(k - (N-1)/2)^2 / (2 (cutoff N / 2)^2))`,
  `k = 0..N-1` (in the un-shifted spectrum the centre index is the highest frequency, so `g` keeps
  the low frequencies), orthonormal inverse FFT, and per token
  `e_j = sum_c |low_jc| / mean_j' sum_c |X_j'c|`.
- FAMT importance (`famt_importance`): `s_j * e_j`.

Everything uses `keras.ops` / `keras.random` only (TensorFlow, JAX and PyTorch backends) and computes
in float32.
"""

import math
import numbers

import numpy as np
from keras import ops

#: Added to the min-max range of AMT's normalisation (a constant [CLS] row gives zeros, not NaN).
EPSILON = 1e-12


def _check_attention(attention):
    attention = ops.cast(ops.convert_to_tensor(attention), "float32")
    shape = tuple(attention.shape)
    if len(shape) != 4 or shape[-1] != shape[-2] or (shape[-1] is not None and shape[-1] < 2):
        raise ValueError(
            "`attention` must be the softmax attention (batch, heads, 1 + N, 1 + N) of the last block, "
            f"[CLS] first, with N >= 1 patch tokens; got shape {shape}."
        )
    return attention


def amt_importance(attention):
    """AMT importance `(B, N)`: per head the [CLS] row over the patches, min-max normalised, head mean.

    `a_j = mean_h (A_h[0, j] - min_k A_h[0, k]) / (max_k A_h[0, k] - min_k A_h[0, k] + EPSILON)`,
    `j, k = 1..N`. Each head contributes values in [0, 1]; a constant row contributes zeros.

    Args:
        attention: `(B, heads, 1 + N, 1 + N)` softmax attention of the last block, [CLS] first.
    """
    attention = _check_attention(attention)
    cls_row = attention[:, :, 0, 1:]
    low = ops.min(cls_row, axis=-1, keepdims=True)
    high = ops.max(cls_row, axis=-1, keepdims=True)
    return ops.mean((cls_row - low) / (high - low + EPSILON), axis=1)


def famt_attention_score(attention):
    """FAMT attention score `(B, N)` (the authors' code).

    `s_j = mean_h( A_h[0, j] * mean_i A_h[i, 0] ) + mean_h( mean_i A_h[i, j] * A_h[0, 0] )`, with
    `i, j = 1..N` (patch tokens; index 0 is [CLS]): how much [CLS] attends to patch `j`, weighted by
    how much the patches attend to [CLS], plus how much the patches attend to `j`, weighted by
    [CLS]'s self-attention.

    Args:
        attention: `(B, heads, 1 + N, 1 + N)` softmax attention of the last block, [CLS] first.
    """
    attention = _check_attention(attention)
    cls_to_patches = attention[:, :, 0, 1:]  # A_h[0, j]            (B, H, N)
    patches_to_cls = ops.mean(attention[:, :, 1:, 0], axis=-1, keepdims=True)  # mean_i A_h[i, 0]
    patches_to_patches = ops.mean(attention[:, :, 1:, 1:], axis=2)  # mean_i A_h[i, j]  (B, H, N)
    cls_to_cls = attention[:, :, 0:1, 0]  # A_h[0, 0]  (B, H, 1)
    return ops.mean(cls_to_patches * patches_to_cls, axis=1) + ops.mean(patches_to_patches * cls_to_cls, axis=1)


def frequency_kernel(num_tokens, cutoff=0.15):
    """FAMT's real kernel over the un-shifted 1-D spectrum, a float32 NumPy array `(N,)`.

    `g_k = 1 - exp(-(k - (N-1)/2)^2 / (2 (cutoff N / 2)^2))`, `k = 0..N-1`: about 0 at the centre
    index (the highest frequency) and close to 1 at both ends (the lowest frequencies).
    """
    if isinstance(cutoff, bool) or not isinstance(cutoff, numbers.Real) or not math.isfinite(cutoff) or cutoff <= 0:
        raise ValueError(f"`cutoff` must be a finite number > 0, got {cutoff!r}.")
    k = np.arange(num_tokens, dtype=np.float64)
    sigma = cutoff * num_tokens / 2.0
    return (1.0 - np.exp(-((k - (num_tokens - 1) / 2.0) ** 2) / (2.0 * sigma**2))).astype("float32")


def low_frequency_energy(tokens, cutoff=0.15):
    """FAMT's per-token low-frequency energy `(B, N)`, float32.

    `low = ifft(g * fft(X))` along the token axis, per channel, both FFTs orthonormal, `g` from
    `frequency_kernel(N, cutoff)`; then `e_j = sum_c |low_jc| / mean_j' sum_c |X_j'c|` (complex
    modulus; the denominator is floored at 1e-30 so all-zero features give zeros, not NaN).

    Args:
        tokens: `(B, N, C)` patch-token features of the last block (no [CLS]).
        cutoff: kernel width as a fraction of `N` (authors: 0.15).
    """
    tokens = ops.cast(ops.convert_to_tensor(tokens), "float32")
    if len(tokens.shape) != 3 or tokens.shape[1] is None:
        raise ValueError(
            f"`tokens` must have shape (batch, N, channels) with a static N, got {tuple(tokens.shape)}."
        )
    num_tokens = int(tokens.shape[1])
    kernel = ops.convert_to_tensor(frequency_kernel(num_tokens, cutoff), dtype="float32")
    x = ops.transpose(tokens, (0, 2, 1))  # (B, C, N): the FFT runs over the last axis.
    real, imag = ops.fft((x, ops.zeros_like(x)))
    # Orthonormal forward and inverse scale by 1/sqrt(N) each: 1/N in total. The inverse FFT is
    # conj(fft(conj(z))) / N; the outer conj does not change the modulus and is skipped.
    real, imag = ops.fft((real * kernel, -(imag * kernel)))
    modulus = ops.sqrt(real**2 + imag**2) / float(num_tokens)
    energy = ops.sum(modulus, axis=1)  # (B, N)
    norm = ops.mean(ops.sum(ops.abs(tokens), axis=2), axis=1, keepdims=True)
    return energy / ops.maximum(norm, 1e-30)


def famt_importance(attention, tokens, cutoff=0.15):
    """FAMT importance `(B, N)`: `famt_attention_score(attention) * low_frequency_energy(tokens)`.

    Args:
        attention: `(B, heads, 1 + N, 1 + N)` softmax attention of the last block, [CLS] first.
        tokens: `(B, N, C)` the same block's **patch** tokens only (drop [CLS] first).
        cutoff: frequency kernel width as a fraction of `N` (authors: 0.15).
    """
    attention = _check_attention(attention)
    tokens = ops.convert_to_tensor(tokens)
    if len(tokens.shape) != 3:
        raise ValueError(f"`tokens` must have shape (batch, N, channels), got {tuple(tokens.shape)}.")
    sequence, num_tokens = attention.shape[-1], tokens.shape[1]
    if sequence is not None and num_tokens is not None and sequence != num_tokens + 1:
        raise ValueError(
            f"`attention` covers {sequence} tokens ([CLS] + {sequence - 1} patches) but `tokens` has "
            f"{num_tokens}; pass the patch tokens only, without [CLS], shape (batch, {sequence - 1}, C)."
        )
    batch_a, batch_t = attention.shape[0], tokens.shape[0]
    if batch_a is not None and batch_t is not None and batch_a != batch_t:
        raise ValueError(f"`attention` and `tokens` have different batch sizes: {batch_a} and {batch_t}.")
    return famt_attention_score(attention) * low_frequency_energy(tokens, cutoff)
