"""The authors' pre-training recipes: AdamW with PyTorch's update, learning-rate schedules,
weight-decay rules, one `Recipe` per family of methods.

| recipe | methods | peak lr | warm-up | decay | min lr | betas | clip | no weight decay on |
|---|---|---|---|---|---|---|---|---|
| `mfm` | mfm, sr, deblur, denoise | 3e-4 x B / 512 | 20 of 300 epochs, from 2.5e-7 x B / 512 | cosine over the whole run (timm) | 2.5e-6 x B / 512 | (0.9, 0.95) | 3.0 | biases, norms, position embedding, [CLS] |
| `mae` | mae, amt, famt | 1.5e-4 x B / 256 | 40 of 400 epochs, from 0 | half-cycle cosine after the warm-up | 0 | (0.9, 0.95) | none | biases, norms |
| `simmim` | simmim, simmim_famt | 1e-4 x B / 512 | 10 of 800 epochs, from 5e-7 x B / 512 | x 0.1 at epoch 700 of 800 | - | (0.9, 0.999) | 5.0 | biases, norms, position embedding, [CLS] |

All: AdamW with epsilon 1e-8 after the bias correction (`AdamW` below), weight decay 0.05, the
learning rate set per step. `RECIPES` holds these numbers; everything else reads them from there.
"""

import dataclasses
import math

import keras
from keras import ops

from keras_mfm import backend


def scaled_learning_rate(base_lr, batch_size, reference_batch_size=512):
    """Linear scaling rule: `lr = base_lr * batch_size / reference_batch_size`."""
    return base_lr * batch_size / reference_batch_size


def warmup_cosine_schedule(peak_lr, total_steps, warmup_steps, min_lr=0.0):
    """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then cosine decay to `min_lr`.

    `lr(t) = peak * t / warmup` for `t < warmup`, else
    `min_lr + (peak - min_lr) * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2`.
    """
    _check_schedule(peak_lr, total_steps, warmup_steps)
    alpha = min(max(min_lr / peak_lr, 0.0), 1.0)
    decay_steps = max(total_steps - warmup_steps, 1)
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(peak_lr, decay_steps, alpha=alpha)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps, alpha=alpha, warmup_target=peak_lr, warmup_steps=warmup_steps
    )


def _check_schedule(peak_lr, total_steps, warmup_steps):
    if total_steps <= 0:
        raise ValueError(f"`total_steps` must be positive, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"`warmup_steps` must be in [0, total_steps={total_steps}], got {warmup_steps}.")
    if peak_lr <= 0:
        raise ValueError(f"The learning rate must be positive, got {peak_lr}.")


DECAYS = ("cosine", "multistep")


@keras.saving.register_keras_serializable(package="keras_mfm")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Per-step learning rate: linear warm-up, then cosine or step decay (the authors' schedulers).

    With `t` the step, `W` the warm-up steps, `T` the total steps:

        t < W:                     warmup_lr + (peak - warmup_lr) * t / W
        cosine, warmup_prefix:     min + (peak - min) (1 + cos(pi (t - W) / (T - W))) / 2   (MAE)
        cosine, no warmup_prefix:  min + (peak - min) (1 + cos(pi t / T)) / 2   (timm, MFM)
        multistep:                 peak * gamma ** #{milestones <= t}          (SimMIM)

    Args:
        peak_lr, total_steps, warmup_steps, warmup_lr, min_lr: as above.
        decay: "cosine" or "multistep".
        warmup_prefix: whether the cosine starts after the warm-up (MAE) or at step 0 (timm's
            `CosineLRScheduler` default, which MFM uses: the lr steps down slightly at the end of
            the warm-up).
        milestones: steps of the multistep decay; gamma: its factor.
    """

    def __init__(self, peak_lr, total_steps, warmup_steps=0, warmup_lr=0.0, min_lr=0.0, decay="cosine",
                 warmup_prefix=True, milestones=(), gamma=0.1, name="warmup_schedule"):
        _check_schedule(peak_lr, total_steps, warmup_steps)
        if decay not in DECAYS:
            raise ValueError(f"Unknown decay {decay!r}; choose one of {DECAYS}.")
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_lr = float(warmup_lr)
        self.min_lr = float(min_lr)
        self.decay = decay
        self.warmup_prefix = bool(warmup_prefix)
        self.milestones = tuple(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.name = name

    def __call__(self, step):
        t = ops.cast(step, "float32")
        peak = self.peak_lr
        if self.warmup_steps:
            warm = self.warmup_lr + (peak - self.warmup_lr) * t / self.warmup_steps
        else:
            warm = ops.zeros_like(t)
        if self.decay == "multistep":
            passed = sum(ops.cast(t >= m, "float32") for m in self.milestones) if self.milestones else 0.0
            after = peak * ops.power(self.gamma, passed) if self.milestones else ops.full_like(t, peak)
        else:
            if self.warmup_prefix:
                progress = (t - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
            else:
                progress = t / self.total_steps
            progress = ops.clip(progress, 0.0, 1.0)
            after = self.min_lr + (peak - self.min_lr) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(t < self.warmup_steps, warm, after)

    def get_config(self):
        return {
            "peak_lr": self.peak_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
            "warmup_lr": self.warmup_lr, "min_lr": self.min_lr, "decay": self.decay,
            "warmup_prefix": self.warmup_prefix, "milestones": list(self.milestones), "gamma": self.gamma,
            "name": self.name,
        }


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Optimiser and schedule of a pre-training run; `RECIPES` holds the authors' three.

    Learning rates (`base_lr`, `min_lr`, `warmup_lr`) are per `reference_batch_size` images and
    scale linearly with the batch (as `main_mfm.py` / `main_simmim.py` scale all three; MAE's min
    and warm-up lr are 0). `lr` (absolute) replaces the scaled peak.
    """

    name: str = "mfm"
    base_lr: float = 3e-4
    reference_batch_size: int = 512
    lr: float = None
    min_lr: float = 2.5e-6
    warmup_lr: float = 2.5e-7
    warmup_fraction: float = 20 / 300
    decay: str = "cosine"
    warmup_prefix: bool = False
    milestones: tuple = ()  # multistep decay: fractions of the run
    gamma: float = 0.1
    weight_decay: float = 0.05
    beta_1: float = 0.9
    beta_2: float = 0.95
    epsilon: float = 1e-8
    clip_norm: float = 3.0  # global gradient norm; 0 or None: no clipping
    no_decay_names: tuple = ("cls_token", "position_embedding")  # besides every variable of rank <= 1

    def learning_rate(self, batch_size):
        if self.lr is not None:
            return self.lr
        return scaled_learning_rate(self.base_lr, batch_size, self.reference_batch_size)

    def scaled(self, value, batch_size):
        """A per-reference-batch rate (`min_lr`, `warmup_lr`) for `batch_size` images."""
        return scaled_learning_rate(value, batch_size, self.reference_batch_size)

    def schedule(self, batch_size, total_steps, warmup_steps=None):
        """The `WarmupSchedule` of a run of `total_steps` steps of `batch_size` images."""
        if warmup_steps is None:
            warmup_steps = int(round(self.warmup_fraction * total_steps))
        return WarmupSchedule(
            self.learning_rate(batch_size), total_steps, warmup_steps,
            warmup_lr=self.scaled(self.warmup_lr, batch_size) if warmup_steps else 0.0,
            min_lr=self.scaled(self.min_lr, batch_size), decay=self.decay, warmup_prefix=self.warmup_prefix,
            milestones=[int(round(m * total_steps)) for m in self.milestones], gamma=self.gamma,
        )

    def to_json(self):
        values = dataclasses.asdict(self)
        values["milestones"], values["no_decay_names"] = list(self.milestones), list(self.no_decay_names)
        return values


#: The authors' recipes (their configs: MFM's ViT-B 300-epoch config, MAE's `main_pretrain.py` with
#: the paper's 1.5e-4 per 256, SimMIM's ViT-B 800-epoch config).
RECIPES = {
    "mfm": Recipe(),
    "mae": Recipe(
        name="mae", base_lr=1.5e-4, reference_batch_size=256, min_lr=0.0, warmup_lr=0.0, warmup_fraction=40 / 400,
        warmup_prefix=True, clip_norm=0.0, no_decay_names=(),
    ),
    "simmim": Recipe(
        name="simmim", base_lr=1e-4, min_lr=5e-6, warmup_lr=5e-7, warmup_fraction=10 / 800, decay="multistep",
        milestones=(700 / 800,), beta_2=0.999, clip_norm=5.0,
    ),
}


def get_recipe(name, **overrides):
    """`RECIPES[name]` with `overrides` (fields of `Recipe`; None values are ignored)."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)}.")
    fields = {f.name for f in dataclasses.fields(Recipe)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"Unknown recipe settings {sorted(unknown)}; the fields are {sorted(fields)}.")
    return dataclasses.replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


def no_weight_decay_variables(model, no_decay_names=RECIPES["mfm"].no_decay_names):
    """Variables without weight decay: every variable of rank <= 1 (biases, normalisation
    parameters, layer scales) and those whose path contains one of `no_decay_names`."""
    return [
        v for v in model.trainable_variables
        if len(v.shape) <= 1 or any(name in v.path for name in no_decay_names)
    ]


@keras.saving.register_keras_serializable(package="keras_mfm")
class AdamW(keras.optimizers.AdamW):
    """AdamW with PyTorch's update (`torch.optim.AdamW`, which both authors' codes train with).

    At step `s` (1-based), with decoupled weight decay applied first (`w *= 1 - lr * wd`):

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        w = w - lr * (m / (1 - b1^s)) / (sqrt(v / (1 - b2^s)) + eps)

    i.e. epsilon is added to the *bias-corrected* `sqrt(v_hat)`, default 1e-8. Keras' AdamW adds
    it before the correction, `w -= lr sqrt(1 - b2^s) / (1 - b1^s) * m / (sqrt(v) + eps)` with
    eps 1e-7: the same update needs `eps_keras = eps * sqrt(1 - b2^s)`, which is what this class
    uses. `bias_corrected_epsilon=False` gives Keras' update (and is what a checkpoint saved
    without the setting resumes with).

    On the PyTorch backend the step (global gradient-norm clipping, weight decay, Adam) runs as
    `torch._foreach_norm` + `torch._fused_adamw_` (`keras_mfm.backend.torch.adamw`) instead of
    Keras' ~ten `_foreach` passes. That path is taken when it applies exactly: PyTorch backend
    with the fused kernel, no `clipnorm`/`clipvalue` (only `global_clipnorm`), no `amsgrad`, EMA
    or gradient accumulation. Otherwise this is Keras' AdamW with the epsilon above.
    """

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 bias_corrected_epsilon=True, **kwargs):
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, beta_1=beta_1, beta_2=beta_2,
                         epsilon=epsilon, **kwargs)
        if self.amsgrad and bias_corrected_epsilon:
            raise ValueError("`amsgrad=True` is only supported with `bias_corrected_epsilon=False`.")
        self.bias_corrected_epsilon = bool(bias_corrected_epsilon)

    #: under `tf.distribute`: all-reduce the replicas' gradients, clip their sum, and skip Keras' own
    #: all-reduce (Keras clips each replica's share first); set by `distribution.clip_after_all_reduce`
    clip_summed_gradients = False

    def _clip_gradients(self, grads):
        if self.clip_summed_gradients:
            grads = backend.sum_over_replicas(grads)
        return super()._clip_gradients(grads)

    def _all_reduce_sum_gradients(self, grads_and_vars):  # TensorFlow's optimizer only
        if self.clip_summed_gradients:
            return list(grads_and_vars)  # summed already, in _clip_gradients
        return super()._all_reduce_sum_gradients(grads_and_vars)

    def get_config(self):
        config = super().get_config()
        config["bias_corrected_epsilon"] = self.bias_corrected_epsilon
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config.setdefault("bias_corrected_epsilon", False)  # saved before the setting existed: Keras' update
        return super().from_config(config, custom_objects=custom_objects)

    def update_step(self, gradient, variable, learning_rate):
        """Keras' Adam step with epsilon `eps * sqrt(1 - b2^s)` when `bias_corrected_epsilon`."""
        if not self.bias_corrected_epsilon:
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        lr = keras.ops.cast(learning_rate, dtype)
        gradient = keras.ops.cast(gradient, dtype)
        step = keras.ops.cast(self.iterations + 1, dtype)
        correction_1 = 1 - keras.ops.power(keras.ops.cast(self.beta_1, dtype), step)
        correction_2 = keras.ops.sqrt(1 - keras.ops.power(keras.ops.cast(self.beta_2, dtype), step))
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign_add(m, keras.ops.multiply(keras.ops.subtract(gradient, m), 1 - self.beta_1))
        self.assign_add(v, keras.ops.multiply(keras.ops.subtract(keras.ops.square(gradient), v), 1 - self.beta_2))
        denominator = keras.ops.add(keras.ops.sqrt(v), self.epsilon * correction_2)
        update = keras.ops.multiply(m, lr * correction_2 / correction_1)
        self.assign_sub(variable, keras.ops.divide(update, denominator))

    def _fused_path(self):
        if not backend.ON_TORCH or self.amsgrad or self.use_ema:
            return False
        if self.gradient_accumulation_steps or self.clipnorm or self.clipvalue:
            return False
        from keras_mfm.backend.torch import adamw as fused_adamw_torch

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
        from keras_mfm.backend.torch import adamw as fused_adamw_torch

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
            bias_corrected_epsilon=self.bias_corrected_epsilon,
        )


def build_optimizer(model, recipe, batch_size, total_steps, warmup_steps=None):
    """AdamW of `recipe` with its schedule; `model` must be built (its variables exist)."""
    optimizer = AdamW(
        learning_rate=recipe.schedule(batch_size, total_steps, warmup_steps),
        weight_decay=recipe.weight_decay,
        beta_1=recipe.beta_1,
        beta_2=recipe.beta_2,
        epsilon=recipe.epsilon,
        global_clipnorm=recipe.clip_norm or None,
    )
    exclude_from_weight_decay(model, optimizer, recipe.no_decay_names)
    return optimizer


def base_optimizer(optimizer):
    """The optimizer that applies the recipe: the AdamW inside a `LossScaleOptimizer` (which Keras
    wraps around it under mixed_float16), else `optimizer` itself."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def exclude_from_weight_decay(model, optimizer, no_decay_names=RECIPES["mfm"].no_decay_names):
    """Apply a recipe's no-decay rule to `optimizer` (again after loading a checkpoint)."""
    if not model.built:
        raise ValueError("Build the model before creating its optimizer (its variables must exist).")
    base_optimizer(optimizer).exclude_from_weight_decay(var_list=no_weight_decay_variables(model, no_decay_names))
