"""Token selection (masking and throwing) for MAE, AMT and FAMT (SPEC.md s. 2).

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
