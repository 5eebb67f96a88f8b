"""2-D sine-cosine position embedding (fixed), as used by MAE."""

import numpy as np


def sincos_1d(dim, positions):
    """`(P,) -> (P, dim)`: `[sin(p * w_i), cos(p * w_i)]` with `w_i = 10000 ** (-i / (dim / 2))`."""
    if dim % 2:
        raise ValueError(f"The sine-cosine embedding needs an even dimension, got {dim}.")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.asarray(positions, dtype=np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim, grid_size, cls_token=True):
    """Fixed 2-D embedding of a `(h, w)` patch grid, `(1 + h * w, dim)` float32 (row-major patches).

    Half of the channels encode the column index, half the row index (MAE's layout); the [CLS]
    position, when present, is all zeros.
    """
    if dim % 4:
        raise ValueError(f"The 2-D sine-cosine embedding needs a dimension divisible by 4, got {dim}.")
    height, width = grid_size
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    embedding = np.concatenate(
        [sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], axis=1
    )
    if cls_token:
        embedding = np.concatenate([np.zeros((1, dim)), embedding], axis=0)
    return embedding.astype("float32")
