"""Everything in keras_mfm that depends on the Keras backend, in one place, chosen once at import
(as Keras keeps its own in `keras/src/backend/<name>/`). Model and layer code uses `keras.ops`,
`keras.layers` and `keras.random` only, and reaches backend-specific code through this module:

- `input_gradient(fn, x)`: `d fn(x) / d x` for a scalar-valued `fn` (Keras 3 has no backend-neutral
  `grad`; training goes through `model.fit`, but FGSM needs the gradient of the loss on the images);
- `ON_TORCH`: whether PyTorch's fused kernels may be used (`keras_mfm.backend.torch.layers` behind
  `layers.fused` and the transformer's attention; `keras_mfm.backend.torch.adamw` behind the
  recipe's AdamW); they are imported only on that backend.

Distribution (data parallelism on JAX and TensorFlow) has its own module, `keras_mfm.distribution`.
"""

import keras

NAME = keras.backend.backend()
ON_TORCH = NAME == "torch"

if NAME == "tensorflow":
    from keras_mfm.backend.tensorflow import input_gradient
elif NAME == "jax":
    from keras_mfm.backend.jax import input_gradient
elif NAME == "torch":
    from keras_mfm.backend.torch import input_gradient
else:  # pragma: no cover - Keras has no other training backend
    raise ImportError(f"keras_mfm supports the tensorflow, jax and torch backends of Keras, not {NAME!r}.")

__all__ = ["NAME", "ON_TORCH", "input_gradient"]
