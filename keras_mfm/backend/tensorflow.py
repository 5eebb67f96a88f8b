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


def scale_loss_for_replicas(loss):
    """`loss / replicas` inside a `tf.distribute` replica (whose gradients are then summed), else `loss`.

    Keras' own `Loss` objects do this; the methods' `compute_loss` return their own loss, so they
    call this instead.
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas == 1 or tf.distribute.in_cross_replica_context():
        return loss
    return loss / keras.ops.cast(replicas, loss.dtype)


def fold_in_replica(seed):
    """A random-op seed (shape `(2,)`, Keras' seed dtype) made distinct for each `tf.distribute` replica.

    Under `tf.distribute` every replica runs the step with its own copy of each `SeedGenerator`
    state, all equal, so without this each replica would draw the same random numbers for its
    share of the global batch (the same mask pattern on different images). Inside a replica of a
    strategy with several replicas the replica id is folded in (`tf.random.fold_in`, a hash of seed
    and id); elsewhere (one device, the cross-replica context) the seed is returned unchanged, so
    those draws stay bit-identical. The generator's state advances as before: resumes hold.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return seed
    # fold_in takes int32 seeds under XLA: the same reduction as Keras' own seed cast
    narrow = tf.cast(tf.math.floormod(tf.cast(seed, tf.int64), tf.int32.max - 1), tf.int32)
    folded = tf.random.fold_in(narrow, tf.cast(context.replica_id_in_sync_group, tf.int32))
    return tf.cast(folded, seed.dtype)


def sum_over_replicas(grads):
    """Each gradient summed over the `tf.distribute` replicas (None kept), inside a replica of a
    strategy with several; unchanged elsewhere."""
    context = tf.distribute.get_replica_context()
    if context is None or tf.distribute.get_strategy().num_replicas_in_sync == 1:
        return grads
    summed = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, [g for g in grads if g is not None]))
    return [None if g is None else next(summed) for g in grads]
