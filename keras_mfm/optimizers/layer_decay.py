"""Fine-tuning's optimiser: AdamW with a layer-wise learning-rate decay (BEiT/MAE), and the decay
scales of a ViT encoder's variables. A plain Keras 3 optimiser (backend-agnostic `keras.ops` code in
`update_step`), registered for `.keras` saving under the package name `keras_mfm`.
"""

import warnings

import keras
from keras import ops

__all__ = ["LayerDecayAdamW", "layer_decay_scales"]


def _path_matches(path, key):
    """`key` names the variable at `path`: equal, or equal up to leading path components."""
    return path == key or path.endswith("/" + key) or key.endswith("/" + path)


@keras.saving.register_keras_serializable(package="keras_mfm")
class LayerDecayAdamW(keras.optimizers.AdamW):
    """AdamW with a per-variable learning-rate scale (layer-wise lr decay, BEiT/MAE fine-tuning).

    The effective learning rate of variable `v` is `lr * scale(v)`, and so is the rate of its
    decoupled weight decay, as with PyTorch parameter groups: per step, first
    `w -= lr * scale * weight_decay * w` (skipped for variables excluded with
    `exclude_from_weight_decay`), then the Adam update with step size `lr * scale`, both with the
    same gradient.

    Args:
        learning_rate: float or a `keras.optimizers.schedules.LearningRateSchedule`.
        lr_scales: dict `{variable.path: scale}` (see `layer_decay_scales`); variables not in it
            get scale 1.
        weight_decay, beta_1, beta_2, epsilon, amsgrad, **kwargs: as `keras.optimizers.AdamW`.
        no_decay_paths: paths of variables excluded from weight decay. Filled in by
            `exclude_from_weight_decay(var_list=...)` (so that the exclusion is part of the config
            and survives `.keras` save/load); rarely passed by hand.
        no_decay_names: the `var_names` of `exclude_from_weight_decay`, kept for the same reason.

    Variable paths are not stable across `.keras` save/load (a `Sequential` built with an
    `Input` names its weights `sequential_2/hidden/kernel`, the reloaded one `hidden/kernel`), so
    a key of `lr_scales` / `no_decay_paths` names a variable when it equals its path up to
    leading path components (whole components: `a/b/kernel` matches `b/kernel` and
    `x/a/b/kernel`, not `ab/kernel`); an exact match wins, and a variable matched by several
    keys with different scales is an error. The per-variable scales are resolved once, in
    `build`.

    Implementation of the weight decay (Keras 3.15): the base class applies the decoupled decay
    in `_apply_weight_decay(variables)` with the global learning rate, before `update_step`; the
    TensorFlow (`TFOptimizer`) and torch (`TorchOptimizer`) backend classes override that method,
    but they sit *above* `keras.optimizers.AdamW` in the MRO, so the override here wins on every
    backend. It is a no-op, and the scaled decay is done at the start of `update_step`, which
    every backend calls once per variable for a subclass (torch swaps in its fused `_foreach`
    AdamW only when the class is exactly `AdamW`; TF calls `update_step` per variable under
    `distribution.extended.update`; JAX inside the trainer's stateless scope).
    `self.weight_decay` is kept (AdamW rejects `None`) for the config and to switch decay off
    when it is 0. On TensorFlow `update_step` receives the raw `tf.Variable`, which has no Keras
    `path`, so everything is looked up by the variable's index in the built variable list.
    """

    def __init__(
        self,
        learning_rate=0.001,
        lr_scales=None,
        weight_decay=0.05,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-7,
        amsgrad=False,
        name=None,
        no_decay_paths=None,
        no_decay_names=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            name=name,
            **kwargs,
        )
        lr_scales = {} if lr_scales is None else lr_scales
        if not isinstance(lr_scales, dict):
            raise ValueError(
                f"`lr_scales` must be a dict {{variable.path: scale}}, got {type(lr_scales)}."
            )
        self.lr_scales = {str(path): float(scale) for path, scale in lr_scales.items()}
        for path, scale in self.lr_scales.items():
            if scale < 0:
                raise ValueError(f"Learning-rate scales must be >= 0, got {scale} for {path!r}.")
        self.no_decay_paths = [str(path) for path in (no_decay_paths or [])]
        self.no_decay_names = [str(name) for name in (no_decay_names or [])]
        # True until `exclude_from_weight_decay` is called: the exclusion then comes from the
        # config (by path) and is resolved against the variables in `build`.
        self._resolve_no_decay_paths = True

    def lr_scale(self, variable):
        """The learning-rate scale of a Keras variable (1.0 when `lr_scales` does not name it)."""
        path = variable.path
        if path in self.lr_scales:
            return self.lr_scales[path]
        found = {s for key, s in self.lr_scales.items() if _path_matches(path, key)}
        if len(found) > 1:
            raise ValueError(
                f"Variable {path!r} is matched by several `lr_scales` keys with different scales "
                f"{sorted(found)}; use full variable paths."
            )
        return found.pop() if found else 1.0

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        super().exclude_from_weight_decay(var_list=var_list, var_names=var_names)
        # Recorded by path so that the exclusion is part of `get_config` (see `build`).
        self.no_decay_paths = [v.path for v in (var_list or [])]
        self.no_decay_names = list(var_names or [])
        self._resolve_no_decay_paths = False  # the exact variables are known

    def build(self, var_list):
        if self.built:
            return
        if self._resolve_no_decay_paths and (self.no_decay_paths or self.no_decay_names):
            # Exclusion from the config (e.g. a loaded model): resolve it by path.
            excluded = [
                v for v in var_list
                if any(_path_matches(v.path, key) for key in self.no_decay_paths)
            ]
            super().exclude_from_weight_decay(var_list=excluded, var_names=self.no_decay_names)
        super().build(var_list)
        self._variable_lr_scales = [self.lr_scale(v) for v in var_list]
        if self.lr_scales and all(s == 1.0 for s in self._variable_lr_scales) and any(
            s != 1.0 for s in self.lr_scales.values()
        ):
            warnings.warn(
                "LayerDecayAdamW: no variable is named by `lr_scales` (all scales are 1); were the "
                "scales computed for another model?",
                stacklevel=2,
            )

    def _apply_weight_decay(self, variables):
        # Deliberately a no-op: the decay is scaled per variable in `update_step` (see class doc).
        return

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        scale = self._variable_lr_scales[index]
        lr = ops.cast(learning_rate, variable.dtype)
        if scale != 1.0:
            lr = lr * ops.cast(scale, variable.dtype)
        # `variable` is a raw tf.Variable on TensorFlow: test the Keras variable it belongs to.
        if self.weight_decay and self._use_weight_decay(self._trainable_variables[index]):
            wd = ops.cast(self.weight_decay, variable.dtype)
            # PyTorch AdamW order: decay the weight first, then the Adam step (same gradient).
            self.assign_sub(variable, ops.multiply(variable, wd * lr))
        super().update_step(gradient, variable, lr)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "lr_scales": dict(self.lr_scales),
                "no_decay_paths": list(self.no_decay_paths),
                "no_decay_names": list(self.no_decay_names),
            }
        )
        return config


def layer_decay_scales(encoder, decay):
    """Layer-wise learning-rate decay scales `{variable.path: decay ** (num_layers - layer_id)}`.

    For a ViT encoder (an object with `depth` and `blocks`, e.g. `ViTBackbone`), with
    `num_layers = depth + 1` and the BEiT/MAE layer ids: [CLS], position embedding and patch
    embedding -> 0; `blocks[i]` -> `i + 1`; everything else of the encoder (the final norm) ->
    `num_layers` (scale 1). Variables are assigned by the sub-layer that owns them, not by name.
    Every variable of the encoder (trainable or not) is in the dict; variables outside it (a
    classifier head) are not, so `LayerDecayAdamW` gives them scale 1 (= `decay ** 0`).

    Encoders without transformer blocks (e.g. the ResNet backbone) have no layer-decay recipe:
    the result is `{}`, i.e. no layer decay.

    The encoder must be built (its variables must exist). `decay` must be in (0, 1].
    """
    decay = float(decay)
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"Layer decay must be in (0, 1], got {decay}.")
    if not (hasattr(encoder, "blocks") and hasattr(encoder, "depth")):
        return {}
    if not encoder.built or not encoder.variables:
        raise ValueError(
            "Build the encoder before computing its layer-decay scales (its variables must exist)."
        )
    num_layers = int(encoder.depth) + 1
    layer_ids = {}
    patch_embedding = getattr(encoder, "patch_embedding", None)
    if patch_embedding is not None:
        for variable in patch_embedding.variables:
            layer_ids[id(variable)] = 0
    for name in ("cls_token", "position_embedding", "mask_token"):
        variable = getattr(encoder, name, None)
        if isinstance(variable, keras.Variable):
            layer_ids[id(variable)] = 0
    for i, block in enumerate(encoder.blocks):
        for variable in block.variables:
            layer_ids[id(variable)] = i + 1
    return {
        variable.path: decay ** (num_layers - layer_ids.get(id(variable), num_layers))
        for variable in encoder.variables
    }
