"""Token selection (masking and throwing) and token importance for MAE, AMT and FAMT (SPEC.md s. 2).

Masked image modeling splits the `N` patch tokens of each image into three disjoint sets:

- **masked** tokens: hidden from the encoder, replaced by mask tokens in the decoder, and the
  reconstruction targets of the loss;
- **thrown** tokens (FAMT): removed from the encoder input, the decoder sequence and the loss;
- **visible** tokens: the encoder's input (with [CLS]).

Selection (`select_tokens`): a weighted random order of the `N` tokens is drawn without replacement,
each next token chosen with probability proportional to its importance `w_j` among those not drawn
yet (Plackett-Luce). Gumbel-top-k draws it in one sort::

    key_j = log(w_j) + g_j,    g_j = -log(-log(U_j)),  U_j ~ Uniform(0, 1)
    order = argsort(key, descending)

The first `num_masked` tokens of the order are masked, the next `num_thrown` are thrown and the rest
are visible, so important tokens tend to be masked and the visible ones tend to be the least
important. Uniform weights give MAE's random masking.

Counts (`token_counts`), as the authors' code computes them: MAE's random masking keeps
`int(N * (1 - mask_ratio))` tokens and masks the rest (`rule="mae"`); AMT/FAMT mask
`int(N * mask_ratio)`, throw `int(N * (mask_ratio + throw_ratio)) - int(N * mask_ratio)` and keep the
rest (`rule="amt"`). ViT-B/16 at 224 (N = 196): MAE 147 masked / 49 visible, FAMT (0.45 / 0.40) 88
masked, 78 thrown, 30 visible; at N = 64 FAMT gives 28 / 26 / 10, at N = 49 MAE masks 37.

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

The stored map follows each image's augmentation (`follow_augmentation`): it is cropped with the
same box, flipped with the same flip and resampled to the training patch grid.

Everything uses `keras.ops` / `keras.random` only (TensorFlow, JAX and PyTorch backends) and computes
in float32.
"""

import collections
import math
import numbers

import keras
import numpy as np
from keras import ops

#: Values of `TokenSelection.labels`.
VISIBLE = 0
MASKED = 1
THROWN = 2

#: Added to the min-max range of AMT's normalisation (a constant [CLS] row gives zeros, not NaN).
EPSILON = 1e-12

# Positive weights are divided by their row maximum and floored at this before the log, so the
# log-weights lie in [log(1e-37), 0] = [-85.2, 0]. Gumbel noise of float32 uniforms in
# [tiny, 1 - 2**-24] lies in [-4.5, 16.7], so any positive weight's key is > -90 > any zero weight's
# key (`_ZERO_WEIGHT_KEY + noise` < -980): zero-weight tokens always come after every positive one,
# in uniformly random order among themselves.
_MIN_RELATIVE_WEIGHT = 1e-37
_ZERO_WEIGHT_KEY = -1000.0
_TINY = float(np.finfo(np.float32).tiny)
_ONE_MINUS_ULP = float(np.float32(1.0) - np.float32(2.0**-24))

TokenSelection = collections.namedtuple("TokenSelection", ["visible", "masked", "thrown", "labels", "order"])
TokenSelection.__doc__ = """Result of `select_tokens` (all int32 tensors).

Fields:
    visible: `(B, num_visible)` indices of the visible tokens, ascending per row.
    masked: `(B, num_masked)` indices of the masked tokens, ascending per row.
    thrown: `(B, num_thrown)` indices of the thrown tokens, ascending per row.
    labels: `(B, N)` per token `VISIBLE` (0), `MASKED` (1) or `THROWN` (2).
    order: `(B, N)` the drawn order (first drawn first), as returned by `draw_order`.
"""


def _check_ratio(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number in [0, 1), got {value!r}.")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value}.")


COUNT_RULES = ("mae", "amt")


def token_counts(num_tokens, mask_ratio, throw_ratio=0.0, rule=None):
    """Number of masked, thrown and visible tokens: `(num_masked, num_thrown, num_visible)` ints.

    - `rule="mae"` (MAE's `random_masking`): `num_visible = int(N * (1 - mask_ratio))`, the rest
      masked; nothing thrown (`throw_ratio` must be 0).
    - `rule="amt"` (AMT/FAMT): `num_masked = int(N * mask_ratio)`,
      `num_thrown = int(N * (mask_ratio + throw_ratio)) - num_masked`, the rest visible.
    - `rule=None`: "mae" without throwing, "amt" with it.

    Raises:
        ValueError: unless `num_tokens` is a positive int, both ratios are in [0, 1) with
            `mask_ratio + throw_ratio < 1`, at least one token stays visible, and a positive
            `mask_ratio` masks at least one token. (`mask_ratio = 0` is allowed and masks nothing.)
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or num_tokens < 1:
        raise ValueError(f"`num_tokens` must be a positive int, got {num_tokens!r}.")
    _check_ratio(mask_ratio, "mask_ratio")
    _check_ratio(throw_ratio, "throw_ratio")
    if mask_ratio + throw_ratio >= 1.0:
        raise ValueError(
            f"`mask_ratio + throw_ratio` must be < 1 so that some tokens stay visible, got "
            f"{mask_ratio} + {throw_ratio} = {mask_ratio + throw_ratio}."
        )
    if rule is None:
        rule = "amt" if throw_ratio else "mae"
    if rule not in COUNT_RULES:
        raise ValueError(f"Unknown counting rule {rule!r}; choose one of {COUNT_RULES}.")
    if rule == "mae" and throw_ratio:
        raise ValueError(f"MAE's counting rule throws nothing; got throw_ratio={throw_ratio} (use rule='amt').")
    num_tokens = int(num_tokens)
    if rule == "mae":
        num_visible = int(num_tokens * (1.0 - mask_ratio))
        num_masked, num_thrown = num_tokens - num_visible, 0
    else:
        num_masked = int(num_tokens * mask_ratio)
        num_thrown = int(num_tokens * (mask_ratio + throw_ratio)) - num_masked
        num_visible = num_tokens - num_masked - num_thrown
    if mask_ratio > 0 and num_masked < 1:
        raise ValueError(
            f"`mask_ratio`={mask_ratio} masks no token out of {num_tokens}; use a larger ratio or more tokens."
        )
    if num_visible < 1:
        raise ValueError(
            f"No visible token left: {num_tokens} tokens, {num_masked} masked, {num_thrown} thrown."
        )
    return num_masked, num_thrown, num_visible


def _concrete_value(x):
    """`x` as a NumPy array if its value is available now, `None` inside a traced/compiled function."""
    if isinstance(x, (np.ndarray, np.generic, list, tuple, numbers.Number)):
        return np.asarray(x)
    try:
        return np.asarray(ops.convert_to_numpy(x))
    except Exception:  # symbolic (tf.function, jax.jit, KerasTensor): cannot be checked here.
        return None


def check_weights(weights):
    """Raise a `ValueError` unless every importance weight is finite and non-negative.

    Run it eagerly on the importance table (NumPy array or eager tensor, any shape). Rows that are
    all zeros are allowed (`draw_order` treats them as uniform). Returns `weights` unchanged.
    """
    value = _concrete_value(weights)
    if value is None:
        raise ValueError(
            "`check_weights` needs concrete weights (a NumPy array or an eager tensor); it cannot "
            "inspect a symbolic or traced tensor."
        )
    value = value.astype("float64", copy=False)
    if not np.all(np.isfinite(value)):
        raise ValueError(f"Importance weights must be finite; found {np.sum(~np.isfinite(value))} NaN/inf values.")
    if np.any(value < 0):
        raise ValueError(f"Importance weights must be >= 0; found minimum {value.min()}.")
    return weights


def _as_weights(weights, validate):
    if validate:
        value = _concrete_value(weights)
        if value is not None:
            check_weights(value)
    weights = ops.cast(ops.convert_to_tensor(weights), "float32")
    if len(weights.shape) != 2:
        raise ValueError(f"`weights` must have shape (batch, num_tokens), got {tuple(weights.shape)}.")
    if weights.shape[1] is None:
        raise ValueError("`weights` needs a static number of tokens (axis 1).")
    return weights


def draw_order(weights, seed=None, validate=True):
    """Weighted random order of the tokens, without replacement (Gumbel-top-k), `(B, N)` int32.

    Each row is a random permutation of `0..N-1` whose first element is token `j` with probability
    `w_j / sum(w)`, the second is drawn likewise among the remaining tokens, and so on. Keys are
    `log(w_j / max(w)) + Gumbel noise` sorted descending.

    - Zero weights always come after every positive weight (uniformly shuffled among themselves).
    - A row of zeros is treated as a row of ones (uniform order, MAE's random masking).
    - Positive weights below `1e-37` times their row's maximum are raised to that (no effect in
      practice).

    Args:
        weights: `(B, N)` non-negative importance, any real dtype (cast to float32).
        seed: int, `None` or a `keras.random.SeedGenerator`. An int gives the same draw at every
            call; in training pass a `SeedGenerator` (under `jax.jit` seeds must not be `None`).
        validate: check concrete weights with `check_weights` (a host copy). Inside a traced or
            compiled function the values cannot be read, so NaN/inf/negative weights are not
            detected there (NaN keys make the order arbitrary); check the table eagerly instead.
    """
    weights = _as_weights(weights, validate)
    row_max = ops.max(weights, axis=1, keepdims=True)
    all_zero = row_max <= 0.0
    weights = ops.where(all_zero, ops.ones_like(weights), weights)
    row_max = ops.where(all_zero, ops.ones_like(row_max), row_max)
    relative = ops.maximum(weights / row_max, _MIN_RELATIVE_WEIGHT)
    uniform = keras.random.uniform(ops.shape(weights), minval=0.0, maxval=1.0, dtype="float32", seed=seed)
    uniform = ops.clip(uniform, _TINY, _ONE_MINUS_ULP)
    gumbel = -ops.log(-ops.log(uniform))
    keys = ops.where(weights > 0.0, ops.log(relative), _ZERO_WEIGHT_KEY) + gumbel
    return ops.cast(ops.argsort(-keys, axis=1), "int32")


def _sorted_slice(order, start, stop):
    part = order[:, start:stop]
    if stop - start <= 1:
        return part
    return ops.cast(ops.sort(part, axis=1), "int32")


def select_tokens(weights, mask_ratio, throw_ratio=0.0, seed=None, validate=True, rule=None):
    """Split the tokens into masked, thrown and visible sets by a weighted random draw.

    The first `num_masked` tokens of `draw_order(weights, seed)` are masked, the next `num_thrown`
    thrown, the rest visible (counts from `token_counts`). All-ones weights give MAE's random
    masking.

    Args:
        weights: `(B, N)` non-negative importance (see `draw_order`; all-zero rows are uniform).
        mask_ratio: share of masked tokens, in [0, 1).
        throw_ratio: share of thrown tokens, in [0, 1) (0 = no throwing).
        seed: int, `None` or a `keras.random.SeedGenerator`.
        validate: raise `ValueError` on NaN/inf/negative weights when they are concrete (NumPy or
            eager tensors); not possible inside traced functions, see `check_weights`.
        rule: the counting rule of `token_counts` ("mae", "amt" or None).

    Returns:
        A `TokenSelection` of int32 tensors: `visible` `(B, num_visible)`, `masked`
        `(B, num_masked)`, `thrown` `(B, num_thrown)` (each ascending per row, so gathering keeps
        raster order), `labels` `(B, N)` (`VISIBLE`/`MASKED`/`THROWN`) and the draw `order` `(B, N)`.
    """
    weights = _as_weights(weights, validate)
    num_tokens = int(weights.shape[1])
    num_masked, num_thrown, _ = token_counts(num_tokens, mask_ratio, throw_ratio, rule)
    order = draw_order(weights, seed, validate=False)
    cut = num_masked + num_thrown
    # rank[b, j] = position of token j in the draw (inverse permutation of `order`).
    rank = ops.argsort(order, axis=1)
    labels = ops.where(rank < num_masked, MASKED, ops.where(rank < cut, THROWN, VISIBLE))
    return TokenSelection(
        visible=_sorted_slice(order, cut, num_tokens),
        masked=_sorted_slice(order, 0, num_masked),
        thrown=_sorted_slice(order, num_masked, cut),
        labels=ops.cast(labels, "int32"),
        order=order,
    )


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


def _grid_pair(grid_size):
    if isinstance(grid_size, numbers.Integral):
        grid_size = (grid_size, grid_size)
    grid_size = tuple(int(g) for g in grid_size)
    if len(grid_size) != 2 or min(grid_size) < 1:
        raise ValueError(f"`grid_size` must be a positive int or a (rows, cols) pair, got {grid_size}.")
    return grid_size


def _sample_positions(start, stop, source, target):
    """Continuous source cell coordinates `(B, target)` of the target cell centres, clamped."""
    # Source cell coordinate of the centre of target cell t: (start + (t + 0.5) / target *
    # (stop - start)) * source - 0.5, arranged so that the identity (0, 1, source == target) is exact.
    scale = (stop - start) * float(source) / float(target)  # (B,)
    steps = ops.arange(target, dtype="float32") + 0.5  # (target,)
    position = start[:, None] * float(source) + steps[None, :] * scale[:, None] - 0.5
    position = ops.clip(position, 0.0, float(source - 1))
    lower = ops.floor(position)
    fraction = position - lower
    lower = ops.cast(lower, "int32")
    upper = ops.minimum(lower + 1, source - 1)
    return lower, upper, fraction


def follow_augmentation(importance_maps, boxes, flips, grid_size):
    """Crop, flip and resample per-image importance maps like their images, `(B, gh * gw)` float32.

    The output cell `(r, c)` of the `gh x gw` training grid shows the crop at fraction
    `((r + 0.5) / gh, (c' + 0.5) / gw)`, with `c' = gw - 1 - c` when the image was flipped
    (the flip follows the crop) and `c' = c` otherwise, i.e. the source point
    `y = y0 + (r + 0.5) / gh * (y1 - y0)`, `x = x0 + (c' + 0.5) / gw * (x1 - x0)`. The map is read
    there by bilinear interpolation between the source cell centres (cell `(i, j)` centred at
    `((i + 0.5) / h, (j + 0.5) / w)`), clamped at the edges (continuous cell coordinates
    `y * h - 0.5`, `x * w - 0.5` clipped to `[0, h - 1]`, `[0, w - 1]`). With the identity box
    `(0, 0, 1, 1)`, no flip and `grid_size == (h, w)` the output equals the input exactly.

    Args:
        importance_maps: `(B, h, w)` importance on the un-augmented image's patch grid.
        boxes: `(B, 4)` crop boxes `(y0, x0, y1, x1)` as fractions of the source image (as returned
            by `keras_mfm.data.random_resized_crop`).
        flips: `(B,)` bool or 0/1: horizontal flip applied after the crop.
        grid_size: int or `(gh, gw)`, the training patch grid.

    Returns:
        `(B, gh * gw)` float32 maps, flattened row-major (the patch token order).
    """
    grid_rows, grid_cols = _grid_pair(grid_size)
    maps = ops.cast(ops.convert_to_tensor(importance_maps), "float32")
    if len(maps.shape) != 3 or maps.shape[1] is None or maps.shape[2] is None:
        raise ValueError(
            f"`importance_maps` must have shape (batch, h, w) with static h, w, got {tuple(maps.shape)}."
        )
    boxes = ops.cast(ops.convert_to_tensor(boxes), "float32")
    if len(boxes.shape) != 2 or boxes.shape[1] != 4:
        raise ValueError(f"`boxes` must have shape (batch, 4) = (y0, x0, y1, x1), got {tuple(boxes.shape)}.")
    flips = ops.convert_to_tensor(flips)
    if len(flips.shape) != 1:
        raise ValueError(f"`flips` must have shape (batch,), got {tuple(flips.shape)}.")
    flips = ops.cast(flips, "float32") > 0.5
    height, width = int(maps.shape[1]), int(maps.shape[2])

    row0, row1, row_fraction = _sample_positions(boxes[:, 0], boxes[:, 2], height, grid_rows)
    col0, col1, col_fraction = _sample_positions(boxes[:, 1], boxes[:, 3], width, grid_cols)
    # Flipped: output column c shows crop column gw - 1 - c.
    col0 = ops.where(flips[:, None], ops.flip(col0, axis=1), col0)
    col1 = ops.where(flips[:, None], ops.flip(col1, axis=1), col1)
    col_fraction = ops.where(flips[:, None], ops.flip(col_fraction, axis=1), col_fraction)

    flat = ops.reshape(maps, (-1, height * width))

    def gather(rows, cols):
        index = ops.reshape(rows[:, :, None] * width + cols[:, None, :], (-1, grid_rows * grid_cols))
        return ops.take_along_axis(flat, index, axis=1)

    fy = ops.reshape(ops.broadcast_to(row_fraction[:, :, None], (ops.shape(maps)[0], grid_rows, grid_cols)),
                     (-1, grid_rows * grid_cols))
    fx = ops.reshape(ops.broadcast_to(col_fraction[:, None, :], (ops.shape(maps)[0], grid_rows, grid_cols)),
                     (-1, grid_rows * grid_cols))
    top = (1.0 - fx) * gather(row0, col0) + fx * gather(row0, col1)
    bottom = (1.0 - fx) * gather(row1, col0) + fx * gather(row1, col1)
    return (1.0 - fy) * top + fy * bottom
