"""Images as sequences of patches and back: the targets and predictions of MAE and SimMIM, and
the figures that draw them.

    patchify    (B, H, W, C) -> (B, N, p * p * C)   N = (H / p)(W / p) patches, row-major;
                                                     pixels (row, col, channel) inside a patch
    unpatchify  (B, N, p * p * C) -> (B, H, W, C)   its inverse, given the patch grid (H / p, W / p)
"""

from keras import ops


def patchify(images, patch_size):
    """`(B, H, W, C) -> (B, N, p * p * C)`, patches row-major, pixels `(row, col, channel)` inside."""
    batch, height, width, channels = ops.shape(images)
    p = patch_size
    x = ops.reshape(images, (batch, height // p, p, width // p, p, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (batch, (height // p) * (width // p), p * p * channels))


def unpatchify(patches, patch_size, grid_size, channels=3):
    """Inverse of `patchify`: `(B, N, p * p * C) -> (B, H, W, C)`."""
    batch = ops.shape(patches)[0]
    (rows, cols), p = grid_size, patch_size
    x = ops.reshape(patches, (batch, rows, cols, p, p, channels))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (batch, rows * p, cols * p, channels))
