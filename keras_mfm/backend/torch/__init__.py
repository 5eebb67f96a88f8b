"""PyTorch-specific code (see `keras_mfm.backend`): input gradients here, the fused layer kernels
in `layers`, the fused AdamW step in `adamw`."""

import keras
import torch


def input_gradient(fn, x):
    """`d fn(x) / d x` for a scalar-valued `fn`: `torch.autograd.grad` on a leaf copy of `x`."""
    x = keras.ops.convert_to_tensor(x, "float32").detach().requires_grad_(True)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(fn(x), x)
    return gradient


def scale_loss_for_replicas(loss):
    """`loss` unchanged: Keras' torch trainer runs on one device."""
    return loss


def fold_in_replica(seed):
    """`seed` unchanged (see `scale_loss_for_replicas`)."""
    return seed


def sum_over_replicas(grads):
    """`grads` unchanged (no per-replica gradients on this backend)."""
    return grads
