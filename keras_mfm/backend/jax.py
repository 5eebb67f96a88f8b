"""JAX-specific code (see `keras_mfm.backend`)."""

import jax
import keras


def input_gradient(fn, x):
    """`d fn(x) / d x` for a scalar-valued `fn`: `jax.grad`."""
    return jax.grad(fn)(keras.ops.convert_to_tensor(x, "float32"))
