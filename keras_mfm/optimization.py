"""The authors' optimisation recipe (SPEC.md section 1, "Recipe").

AdamW (0.9, 0.95), learning rate `base_lr * batch / 512`, weight decay 0.05 on weights only (none
on biases, normalisation parameters, position embedding and [CLS]), per-step linear warm-up then
cosine decay to `min_lr`, global gradient-norm clipping at 3.0. Built from Keras core
(`keras.optimizers.AdamW`, `keras.optimizers.schedules.CosineDecay`); `AdamW` here is Keras' with
the PyTorch backend's step done by PyTorch's fused kernel (same update).
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


@keras.saving.register_keras_serializable(package="keras_mfm")
class AdamW(keras.optimizers.AdamW):
    """`keras.optimizers.AdamW`, same arguments and update; on the PyTorch backend the step (global
    gradient-norm clipping, decoupled weight decay, Adam) runs as `torch._foreach_norm` +
    `torch._fused_adamw_` (`keras_mfm.fused_adamw_torch`) instead of Keras' ~ten `_foreach` passes:
    ~5 ms instead of ~70 ms per step for a 7M-parameter ViT on a CPU.

    The fused path is taken when it applies exactly: PyTorch backend with the fused kernel, no
    `clipnorm`/`clipvalue` (only `global_clipnorm`), no `amsgrad`, EMA or gradient accumulation.
    Otherwise, and on TensorFlow and JAX, this is Keras' AdamW unchanged.
    """

    def _fused_path(self):
        if keras.backend.backend() != "torch" or self.amsgrad or self.use_ema:
            return False
        if self.gradient_accumulation_steps or self.clipnorm or self.clipvalue:
            return False
        from keras_mfm import fused_adamw_torch

        return fused_adamw_torch.available()

    def _update_plan(self, trainable_variables):
        """Per variable: (index of its slots, its weight decay). The same variables come every
        step, so this is worked out once (Keras matches the exclusion names for every variable
        on every step otherwise)."""
        key = (tuple(id(v) for v in trainable_variables), float(self.weight_decay or 0.0))
        if getattr(self, "_plan_key", None) != key:
            self._plan = [
                (self._get_variable_index(v),
                 self.weight_decay if self.weight_decay and self._use_weight_decay(v) else 0.0)
                for v in trainable_variables
            ]
            self._plan_key = key
        return self._plan

    def _backend_apply_gradients(self, grads, trainable_variables):
        if not self._fused_path():
            return super()._backend_apply_gradients(grads, trainable_variables)
        from keras_mfm import fused_adamw_torch

        grads = [g.detach() for g in grads]
        if self.global_clipnorm:
            fused_adamw_torch.clip_by_global_norm(grads, float(self.global_clipnorm))
        groups = {}
        for variable, grad, (index, decay) in zip(trainable_variables, grads, self._update_plan(trainable_variables)):
            value = variable.value
            group = groups.setdefault((value.dtype, value.device, decay), ([], [], [], [], decay))
            group[0].append(value)
            group[1].append(grad.to(value.dtype))
            group[2].append(self._momentums[index].value)
            group[3].append(self._velocities[index].value)
        fused_adamw_torch.adamw_step(
            list(groups.values()),
            step=int(self.iterations.value) + 1,
            lr=self.learning_rate,
            beta_1=float(self.beta_1),
            beta_2=float(self.beta_2),
            epsilon=float(self.epsilon),
        )


def build_optimizer(model, recipe, batch_size, total_steps, warmup_steps=None):
    """AdamW of `recipe` with its schedule; `model` must be built (its variables exist)."""
    if warmup_steps is None:
        warmup_steps = int(round(recipe.warmup_fraction * total_steps))
    schedule = warmup_cosine_schedule(
        recipe.learning_rate(batch_size), total_steps, warmup_steps, recipe.min_lr
    )
    optimizer = AdamW(
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
