"""keras_mfm's optimisers, one concept per module:

- `recipes`: the authors' pre-training recipes (`Recipe`, `RECIPES`), AdamW with PyTorch's update,
  the warm-up schedules and weight-decay rules (also importable as `keras_mfm.optimization`);
- `lars`: LARS, the linear probe's optimiser;
- `layer_decay`: layer-decayed AdamW and the layer-wise decay scales, fine-tuning's optimiser.
"""

from keras_mfm.optimizers.lars import LARS
from keras_mfm.optimizers.layer_decay import LayerDecayAdamW, layer_decay_scales
from keras_mfm.optimizers.recipes import RECIPES, AdamW, Recipe, WarmupSchedule, get_recipe

__all__ = ["AdamW", "LARS", "LayerDecayAdamW", "RECIPES", "Recipe", "WarmupSchedule", "get_recipe",
           "layer_decay_scales"]
