"""The one backend-specific piece of the library: gradients with respect to an input.

Keras 3 has no backend-neutral `grad`; training goes through `model.fit`, but attacks such as
FGSM need `d loss / d images`. Each branch below is the backend's own autodiff.
"""

import keras


def input_gradient(fn, x):
    """`d fn(x) / d x` for a scalar-valued `fn`, as a tensor of the current backend."""
    backend = keras.backend.backend()
    x = keras.ops.convert_to_tensor(x, "float32")
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            value = fn(x)
        return tape.gradient(value, x)
    if backend == "jax":
        import jax

        return jax.grad(fn)(x)
    if backend == "torch":
        import torch

        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(fn(x), x)
        return gradient
    raise NotImplementedError(f"Input gradients are not implemented for the {backend!r} backend.")
