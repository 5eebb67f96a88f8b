"""The image input contract: every model, protocol and export of keras_mfm takes float images
`(B, H, W, 3)` (NHWC) with values in [0, 1].

`check_images` enforces it on a batch at the API boundary (the first batch of a `fit`, of a
feature extraction, of an export check) and raises `ImageInputError`, one line that says what was
found and what would be right, instead of training on 0-255 pixels or reading channels-first
arrays as 32 channels. Nothing is converted silently: pixels in 0-255 must be scaled by the
caller (`images / 255`, or `keras.layers.Rescaling(1 / 255)` in a `tf.data` map).
"""

import keras
import numpy as np

# Resampling (bilinear/bicubic resize, antialiasing) may overshoot [0, 1] by a little.
RANGE_TOLERANCE = 0.01
SCALE_HINT = "divide 0-255 pixels by 255 (e.g. `images / 255` or `keras.layers.Rescaling(1 / 255)`)"


class ImageInputError(ValueError):
    """Images that break the input contract (dtype, rank, channels, size, value range, finiteness)."""


def _as_array(images):
    if hasattr(images, "numpy") and not isinstance(images, np.ndarray):
        try:
            return np.asarray(images.numpy())
        except Exception:  # a symbolic tensor: nothing to check
            return None
    if hasattr(images, "detach"):  # torch tensors
        return np.asarray(images.detach().cpu())
    try:
        return np.asarray(images)
    except Exception:
        return None


def _spec_of(images):
    """`(shape, dtype name)` of a `tf.TensorSpec` / `KerasTensor`-like value without data, else None."""
    if hasattr(images, "shape") and hasattr(images, "dtype") and not hasattr(images, "numpy") \
            and not hasattr(images, "__array__") and not hasattr(images, "detach"):
        shape = tuple(None if d is None else int(d) for d in images.shape)
        return shape, getattr(images.dtype, "name", str(images.dtype))
    return None


def check_images(images, where="images", image_size=None, check_values=True):
    """Raises `ImageInputError` unless `images` is a float `(B, H, W, 3)` batch in [0, 1].

    Args:
        images: an array or eager tensor, or a `tf.TensorSpec` (shape and dtype only; unknown
            dimensions pass); symbolic tensors pass unchecked.
        where: what the message names (e.g. "MFM.fit", "extract_features").
        image_size: `(H, W)` the model expects, or None for any size.
        check_values: also check the range and finiteness (one pass over the batch).
    """
    spec = _spec_of(images)
    if spec is not None:
        shape, dtype = spec
        array = None
    else:
        array = _as_array(images)
        if array is None or array.dtype == object:
            return
        shape, dtype = array.shape, array.dtype.name
    if len(shape) != 4:
        raise ImageInputError(f"{where}: images must be a (batch, height, width, 3) array; got shape {shape}.")
    if shape[0] == 0:
        raise ImageInputError(f"{where}: the batch of images is empty (shape {shape}).")
    if shape[-1] is not None and shape[-1] != 3:
        layout = " (channels first? keras_mfm takes channels-last, NHWC)" if shape[1] == 3 else ""
        raise ImageInputError(f"{where}: images need 3 channels in the last axis; got shape {shape}{layout}.")
    if image_size is not None and None not in shape[1:3] and tuple(shape[1:3]) != tuple(image_size):
        raise ImageInputError(
            f"{where}: images are {shape[1]}x{shape[2]}, the model takes "
            f"{image_size[0]}x{image_size[1]}; resize them (or build the model for that size)."
        )
    if not np.issubdtype(np.dtype(dtype if dtype != "bfloat16" else "float32"), np.floating):
        raise ImageInputError(f"{where}: images must be floats in [0, 1]; got {dtype}: {SCALE_HINT}.")
    if not check_values or array is None:
        return
    values = array.astype("float32", copy=False)
    if not np.all(np.isfinite(values)):
        count = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise ImageInputError(f"{where}: images contain {count} NaN or infinite value(s); check the data.")
    low, high = float(values.min()), float(values.max())
    if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise ImageInputError(range_message(where, low, high))


def range_message(where, low, high):
    hint = SCALE_HINT if high > 1.5 and low >= -RANGE_TOLERANCE else (
        "keras_mfm normalises internally, so pass un-normalised pixels in [0, 1]")
    return f"{where}: images must be in [0, 1]; got values in [{low:.4g}, {high:.4g}]: {hint}."


def images_of(batch):
    """The images of a batch as a data set yields it: `x`, `(x, y[, w])`, or a dict with "images"."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if isinstance(batch, dict):
        return batch.get("images")
    return batch


def is_tf_dataset(x):
    return type(x).__module__.startswith("tensorflow") and hasattr(x, "element_spec")


def first_batch(x):
    """The first batch of what `fit`/`predict` accept, without reading any data: an array (or a dict
    of arrays), a `keras.utils.PyDataset`'s first item, a `tf.data.Dataset`'s element spec (its
    values are checked inside the pipeline, `check_in_pipeline`); `()` for a data set known to be
    empty; None for a one-shot iterator, a generator or a torch `DataLoader` (not checked)."""
    if x is None:
        return None
    if isinstance(x, (np.ndarray, dict)) or (hasattr(x, "shape") and not is_tf_dataset(x)):
        return x
    if is_tf_dataset(x):
        return () if int(x.cardinality()) == 0 else x.element_spec
    if hasattr(x, "__getitem__") and hasattr(x, "__len__") and hasattr(x, "on_epoch_end"):  # PyDataset
        return x[0] if len(x) else ()
    return None


_RANGE_MARK, _FINITE_MARK = "keras_mfm: images outside [0, 1]", "keras_mfm: images not finite"


def check_in_pipeline(dataset):
    """`dataset` with each batch's images checked as it is made (one min/max per batch, no extra pass
    over the data: iterating a data set beforehand would cost a shuffle buffer and, with
    `reshuffle_each_iteration`, change the order the run sees). A bad batch stops the pipeline
    with an error that `raise_input_error` turns into the one-line `ImageInputError`."""
    import tensorflow as tf

    def check(*element):
        images = images_of(element[0] if len(element) == 1 else element)
        if images is None:
            return element[0] if len(element) == 1 else element
        values = tf.cast(images, "float32")
        low, high = tf.reduce_min(values), tf.reduce_max(values)
        finite = tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(values)), [_FINITE_MARK])
        with tf.control_dependencies([finite]):
            in_range = tf.debugging.Assert(
                tf.logical_and(low >= -RANGE_TOLERANCE, high <= 1.0 + RANGE_TOLERANCE), [_RANGE_MARK, low, high])
        with tf.control_dependencies([in_range]):
            element = tf.nest.map_structure(tf.identity, element)
        return element[0] if len(element) == 1 else element

    return dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def raise_input_error(error, where):
    """Re-raises a failed `check_in_pipeline` check as one `ImageInputError` line; else nothing."""
    import re

    text = str(error)
    if _FINITE_MARK in text:
        raise ImageInputError(f"{where}: images contain NaN or infinite values; check the data.") from None
    if _RANGE_MARK in text:
        found = re.search(re.escape(_RANGE_MARK) + r"\]\s*\[([^\]]+)\]\s*\[([^\]]+)\]", text)
        low, high = (float(found.group(1)), float(found.group(2))) if found else (float("nan"), float("nan"))
        raise ImageInputError(range_message(where, low, high)) from None


def progress_bar(dataset, verbose):
    """A `keras.utils.Progbar` over the batches of `dataset` (with a total and an ETA when its
    length is known: lists, finite `tf.data` pipelines), or None when `verbose` is 0."""
    if not verbose:
        return None
    try:
        total = int(len(dataset))
    except (TypeError, ValueError):  # unknown or infinite cardinality
        total = None
    return keras.utils.Progbar(total if total is None or total >= 0 else None, verbose=verbose, unit_name="batch")
