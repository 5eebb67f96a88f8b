"""PyTorch-specific: the recipe's AdamW step (global-norm clipping, decoupled weight decay, Adam)
as two passes over the parameters, for `optimizers.recipes.AdamW` on the torch backend.

Keras' own torch AdamW runs about ten `torch._foreach_*` passes with temporaries, plus a
`keras.ops` global norm; on the 7.2M-parameter MAE of the throughput benchmark that is ~70 ms of a
~170 ms batch-2 step, against ~5 ms here (`torch._foreach_norm`, then `torch._fused_adamw_`).

The update (step `s = iterations + 1`, learning rate `lr` at `iterations`):

    g     = g * clip / max(||g||_global, clip)                  (when global clipping is on)
    w     = w * (1 - lr * weight_decay)                         (decayed variables only)
    m     = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    w     = w - lr * (m / (1 - b1^s)) / (sqrt(v / (1 - b2^s)) + eps)      (PyTorch's epsilon)

which is PyTorch's fused kernel itself. For Keras' convention (`w -= lr sqrt(1 - b2^s) / (1 - b1^s)
* m / (sqrt(v) + eps)`) the kernel is given `eps' = eps / sqrt(1 - b2^s)`, which makes the two
updates the same.
"""

import math

import torch


def available():
    """Whether this PyTorch has the fused AdamW kernel (CPU support since 2.4)."""
    return hasattr(torch, "_fused_adamw_")


@torch.no_grad()
def clip_by_global_norm(grads, clip_norm):
    """Scale `grads` in place by `clip_norm / max(global_norm, clip_norm)`; returns the global norm."""
    norms = torch._foreach_norm(grads)
    global_norm = torch.linalg.vector_norm(torch.stack([n.to(torch.float32) for n in norms]))
    scale = clip_norm / torch.clamp(global_norm, min=clip_norm)
    torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return global_norm


@torch.no_grad()
def adamw_step(groups, step, lr, beta_1, beta_2, epsilon, bias_corrected_epsilon=True):
    """One AdamW update of every group, in place.

    Args:
        groups: list of `(params, grads, m, v, weight_decay)`; the tensors of a group share a
            dtype and a device.
        step: the 1-based step `s` of the bias corrections (a Python int).
        lr: the learning rate (a Python float or a 0-d tensor).
        bias_corrected_epsilon: PyTorch's epsilon (True) or Keras' (False).
    """
    eps = epsilon if bias_corrected_epsilon else epsilon / math.sqrt(1.0 - beta_2**step)
    for params, grads, m, v, weight_decay in groups:
        if not params:
            continue
        device = params[0].device
        steps = [torch.tensor(float(step), device=device)] * len(params)
        rate = float(lr) if device.type == "cpu" else torch.as_tensor(lr, device=device)
        torch._fused_adamw_(
            params, grads, m, v, [], steps,
            lr=rate, beta1=beta_1, beta2=beta_2, weight_decay=weight_decay, eps=eps,
            amsgrad=False, maximize=False,
        )
