"""The authors' optimisation recipe (SPEC.md section 1, "Recipe").

AdamW (0.9, 0.95), learning rate `base_lr * batch / 512`, weight decay 0.05 on weights only (none
on biases, normalisation parameters, position embedding and [CLS]), per-step linear warm-up then
cosine decay to `min_lr`, global gradient-norm clipping at 3.0. Built from Keras core
(`keras.optimizers.AdamW`, `keras.optimizers.schedules.CosineDecay`).
"""

import dataclasses

import keras

NO_DECAY_NAMES = ("cls_token", "position_embedding", "mask_token")


def scaled_learning_rate(base_lr, batch_size, reference_batch_size=512):
    """Linear scaling rule: `lr = base_lr * batch_size / reference_batch_size`."""
    return base_lr * batch_size / reference_batch_size


def warmup_cosine_schedule(peak_lr, total_steps, warmup_steps, min_lr=0.0):
    """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then cosine decay to `min_lr`.

    `lr(t) = peak * t / warmup` for `t < warmup`, else
    `min_lr + (peak - min_lr) * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2`.
    """
    if total_steps <= 0:
        raise ValueError(f"`total_steps` must be positive, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"`warmup_steps` must be in [0, total_steps={total_steps}], got {warmup_steps}.")
    if peak_lr <= 0:
        raise ValueError(f"The learning rate must be positive, got {peak_lr}.")
    alpha = min(max(min_lr / peak_lr, 0.0), 1.0)
    decay_steps = max(total_steps - warmup_steps, 1)
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(peak_lr, decay_steps, alpha=alpha)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps, alpha=alpha, warmup_target=peak_lr, warmup_steps=warmup_steps
    )


def no_weight_decay_variables(model):
    """Biases, normalisation parameters (every variable of rank <= 1), position embedding, [CLS]."""
    return [
        v for v in model.trainable_variables
        if len(v.shape) <= 1 or any(name in v.path for name in NO_DECAY_NAMES)
    ]


@dataclasses.dataclass
class Recipe:
    """Optimiser hyper-parameters; the defaults are the authors' MFM pre-training recipe."""

    base_lr: float = 3e-4
    reference_batch_size: int = 512
    lr: float = None  # absolute learning rate; overrides base_lr scaling when given
    min_lr: float = 2.5e-6
    weight_decay: float = 0.05
    beta_1: float = 0.9
    beta_2: float = 0.95
    clip_norm: float = 3.0
    warmup_fraction: float = 20 / 300  # 20 warm-up epochs of 300

    def learning_rate(self, batch_size):
        if self.lr is not None:
            return self.lr
        return scaled_learning_rate(self.base_lr, batch_size, self.reference_batch_size)


def build_optimizer(model, recipe, batch_size, total_steps, warmup_steps=None):
    """AdamW of `recipe` with its schedule; `model` must be built (its variables exist)."""
    if warmup_steps is None:
        warmup_steps = int(round(recipe.warmup_fraction * total_steps))
    schedule = warmup_cosine_schedule(
        recipe.learning_rate(batch_size), total_steps, warmup_steps, recipe.min_lr
    )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=recipe.weight_decay,
        beta_1=recipe.beta_1,
        beta_2=recipe.beta_2,
        global_clipnorm=recipe.clip_norm or None,
    )
    exclude_from_weight_decay(model, optimizer)
    return optimizer


def base_optimizer(optimizer):
    """The optimizer that applies the recipe: the AdamW inside a `LossScaleOptimizer` (which Keras
    wraps around it under mixed_float16), else `optimizer` itself."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def exclude_from_weight_decay(model, optimizer):
    """Apply the no-decay rule of the recipe to `optimizer` (again after loading a checkpoint)."""
    if not model.built:
        raise ValueError("Build the model before creating its optimizer (its variables must exist).")
    base_optimizer(optimizer).exclude_from_weight_decay(var_list=no_weight_decay_variables(model))
