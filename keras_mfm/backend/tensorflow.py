"""TensorFlow-specific code (see `keras_mfm.backend`)."""

import keras
import tensorflow as tf


def input_gradient(fn, x):
    """`d fn(x) / d x` for a scalar-valued `fn`: a gradient tape watching `x`."""
    x = keras.ops.convert_to_tensor(x, "float32")
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = fn(x)
    return tape.gradient(value, x)
