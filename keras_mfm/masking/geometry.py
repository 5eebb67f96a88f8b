"""How a stored importance map follows an image's augmentation (SPEC.md s. 2).

The stored map follows each image's augmentation (`follow_augmentation`): it is cropped with the
same box, flipped with the same flip and resampled to the training patch grid.

Everything uses `keras.ops` / `keras.random` only (TensorFlow, JAX and PyTorch backends) and computes
in float32.
"""

import numbers

from keras import ops

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
