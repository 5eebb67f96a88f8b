"""JAX-specific code (see `keras_mfm.backend`)."""

import jax
import keras


def input_gradient(fn, x):
    """`d fn(x) / d x` for a scalar-valued `fn`: `jax.grad`."""
    return jax.grad(fn)(keras.ops.convert_to_tensor(x, "float32"))


def scale_loss_for_replicas(loss):
    """`loss` unchanged: JAX's `DataParallel` step is one program over the sharded global batch: its loss is the
    global mean already, and it draws once for the whole batch."""
    return loss


def fold_in_replica(seed):
    """`seed` unchanged (see `scale_loss_for_replicas`)."""
    return seed


def sum_over_replicas(grads):
    """`grads` unchanged (no per-replica gradients on this backend)."""
    return grads
