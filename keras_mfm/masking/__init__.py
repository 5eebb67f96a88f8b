"""Which patch tokens MAE, AMT and FAMT mask and throw, one concept per module (SPEC.md s. 2):

- `selection`: the weighted random draw of the masked / thrown / visible tokens (`select_tokens`,
  `draw_order`, `token_counts`, `TokenSelection` and its labels);
- `scores`: the per-patch importance of AMT (`amt_importance`) and FAMT (`famt_importance`:
  `famt_attention_score` x `low_frequency_energy`);
- `geometry`: a stored importance map following an image's crop and flip (`follow_augmentation`).

Every name is also importable from `keras_mfm.masking` itself.
"""

from keras_mfm.masking.geometry import follow_augmentation
from keras_mfm.masking.scores import (EPSILON, amt_importance, famt_attention_score, famt_importance,
                                      frequency_kernel, low_frequency_energy)
from keras_mfm.masking.selection import (COUNT_RULES, MASKED, THROWN, VISIBLE, TokenSelection, check_weights,
                                         draw_order, select_tokens, token_counts)

__all__ = [
    "COUNT_RULES", "EPSILON", "MASKED", "THROWN", "VISIBLE", "TokenSelection", "amt_importance", "check_weights",
    "draw_order", "famt_attention_score", "famt_importance", "follow_augmentation", "frequency_kernel",
    "low_frequency_energy", "select_tokens", "token_counts",
]
