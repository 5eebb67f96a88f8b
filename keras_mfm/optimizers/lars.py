"""The linear probe's optimiser: LARS (layer-wise adaptive rate scaling), as MAE's linear probe uses
it. A plain Keras 3 optimiser (backend-agnostic `keras.ops` code in `update_step`), registered for
`.keras` saving under the package name `keras_mfm`.
"""

import keras
from keras import ops

__all__ = ["LARS"]


@keras.saving.register_keras_serializable(package="keras_mfm")
class LARS(keras.optimizers.Optimizer):
    """LARS as used by MAE's linear probe (`util/lars.py` of the MAE repository).

    For a variable `w` of rank > 1 (i.e. not a bias or normalisation parameter) with gradient `g`:

        d = g + weight_decay * w
        q = trust_coefficient * ||w|| / ||d||   if ||w|| > 0 and ||d|| > 0, else 1
        d = q * d

    Variables of rank <= 1 use `d = g` (no decay, no trust-ratio adaptation). Then, for every
    variable, `mu = momentum * mu + d` and `w = w - lr * mu`.

    The weight decay is *coupled* (added to the gradient, before the trust ratio), as in MAE; the
    decoupled `weight_decay` mechanism of the Keras base optimizer is not used (the base class is
    given `weight_decay=None`; the value is kept in `self.lars_weight_decay`), so
    `exclude_from_weight_decay` has no effect on LARS: the rank rule decides.

    Args:
        learning_rate: float or a `keras.optimizers.schedules.LearningRateSchedule`.
        momentum: momentum of the (non-dampened, non-Nesterov) velocity buffer.
        weight_decay: coupled L2 weight decay of the rank > 1 variables.
        trust_coefficient: the LARS trust coefficient `eta`.
        **kwargs: the usual Keras optimiser arguments (`clipnorm`, `global_clipnorm`, `use_ema`,
            `gradient_accumulation_steps`, `name`, ...).
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=0.0,
        trust_coefficient=0.001,
        name=None,
        **kwargs,
    ):
        # The base class' decoupled weight decay must stay off: see the class docstring.
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum}.")
        if weight_decay is None:
            weight_decay = 0.0
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        if trust_coefficient <= 0:
            raise ValueError(f"`trust_coefficient` must be positive, got {trust_coefficient}.")
        self.momentum = float(momentum)
        self.lars_weight_decay = float(weight_decay)
        self.trust_coefficient = float(trust_coefficient)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums = [
            self.add_variable_from_reference(variable, name="momentum") for variable in var_list
        ]

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        update = gradient
        if len(variable.shape) > 1:
            weight = ops.convert_to_tensor(variable)
            if self.lars_weight_decay:
                update = ops.add(update, ops.multiply(weight, ops.cast(self.lars_weight_decay, dtype)))
            weight_norm = ops.sqrt(ops.sum(ops.square(weight)))
            update_norm = ops.sqrt(ops.sum(ops.square(update)))
            one = ops.ones_like(weight_norm)
            # Safe denominator, so that the branch not taken never divides by zero.
            safe_norm = ops.where(ops.greater(update_norm, 0), update_norm, one)
            trust_ratio = ops.where(
                ops.logical_and(ops.greater(weight_norm, 0), ops.greater(update_norm, 0)),
                ops.cast(self.trust_coefficient, dtype) * weight_norm / safe_norm,
                one,
            )
            update = ops.multiply(update, trust_ratio)
        mu = self._momentums[self._get_variable_index(variable)]
        new_mu = ops.add(ops.multiply(mu, ops.cast(self.momentum, dtype)), update)
        self.assign(mu, new_mu)
        self.assign_sub(variable, ops.multiply(new_mu, lr))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                # Our own (coupled) decay; the base class' decoupled one is always None.
                "weight_decay": self.lars_weight_decay,
                "trust_coefficient": self.trust_coefficient,
            }
        )
        return config
