"""Everything in keras_mfm that depends on the Keras backend, in one place, chosen once at import
(as Keras keeps its own in `keras/src/backend/<name>/`). Model and layer code uses `keras.ops`,
`keras.layers` and `keras.random` only, and reaches backend-specific code through this module:

- `input_gradient(fn, x)`: `d fn(x) / d x` for a scalar-valued `fn` (Keras 3 has no backend-neutral
  `grad`; training goes through `model.fit`, but FGSM needs the gradient of the loss on the images);
- `scale_loss_for_replicas(loss)`, `fold_in_replica(seed)`, `ReplicaSeedGenerator`: what a model's
  loss and random draws need under `tf.distribute` (each replica's loss divided by the replica
  count; each replica's draws its own), `sum_over_replicas(grads)` (the optimizer's clipping of
  the summed gradient); the identity on one device, JAX and PyTorch;
- `ON_TORCH`: whether PyTorch's fused kernels may be used (`keras_mfm.backend.torch.layers` behind
  `layers.fused` and the transformer's attention; `keras_mfm.backend.torch.adamw` behind the
  recipe's AdamW); they are imported only on that backend.

Setting up data parallelism (JAX and TensorFlow) is `keras_mfm.distribution`'s (the training side).
"""

import keras

NAME = keras.backend.backend()
ON_TORCH = NAME == "torch"

if NAME == "tensorflow":
    from keras_mfm.backend.tensorflow import fold_in_replica, input_gradient, scale_loss_for_replicas, sum_over_replicas
elif NAME == "jax":
    from keras_mfm.backend.jax import fold_in_replica, input_gradient, scale_loss_for_replicas, sum_over_replicas
elif NAME == "torch":
    from keras_mfm.backend.torch import fold_in_replica, input_gradient, scale_loss_for_replicas, sum_over_replicas
else:  # pragma: no cover - Keras has no other training backend
    raise ImportError(f"keras_mfm supports the tensorflow, jax and torch backends of Keras, not {NAME!r}.")



class ReplicaSeedGenerator(keras.random.SeedGenerator):
    """A `keras.random.SeedGenerator` whose draws differ between `tf.distribute` replicas
    (`fold_in_replica`); identical to `SeedGenerator` everywhere else (same state, same numbers).

    Pass it as `seed=` to `keras.random` ops as any `SeedGenerator`.
    """

    def next(self, ordered=True):
        return fold_in_replica(super().next(ordered))


__all__ = ["NAME", "ON_TORCH", "ReplicaSeedGenerator", "fold_in_replica", "input_gradient", "scale_loss_for_replicas",
           "sum_over_replicas"]
