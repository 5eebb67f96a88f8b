"""Moved to `keras_mfm.optimizers.recipes` (the optimisers live in `keras_mfm.optimizers`); this name
stays an alias of that module."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("keras_mfm.optimizers.recipes")
