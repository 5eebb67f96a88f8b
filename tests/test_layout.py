"""The module names that moved keep working: old imports are aliases of the new modules (the same
module objects, so code that patches or reads them sees one module)."""

import importlib

import pytest


@pytest.mark.parametrize("old,new", [
    ("keras_mfm.optimization", "keras_mfm.optimizers.recipes"),
    ("keras_mfm.layers.fused_torch", "keras_mfm.backend.torch.layers"),
    ("keras_mfm.fused_adamw_torch", "keras_mfm.backend.torch.adamw"),
])
def test_moved_modules_are_aliases(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_moved_names_import_from_their_old_homes():
    from keras_mfm.backend import input_gradient
    from keras_mfm.backend_gradients import input_gradient as old_gradient
    from keras_mfm.layers.patches import patchify
    from keras_mfm.models.mae import patchify as old_patchify
    from keras_mfm.models.simmim import SimMIMMasking
    from keras_mfm.models.token_masking import TokenMasking
    from keras_mfm.optimizers import LARS, LayerDecayAdamW, layer_decay_scales  # noqa: F401

    assert old_gradient is input_gradient and old_patchify is patchify and SimMIMMasking is TokenMasking


def test_masking_names_are_importable_from_the_package():
    from keras_mfm import masking
    from keras_mfm.masking import geometry, scores, selection

    assert masking.select_tokens is selection.select_tokens and masking.famt_importance is scores.famt_importance
    assert masking.follow_augmentation is geometry.follow_augmentation
