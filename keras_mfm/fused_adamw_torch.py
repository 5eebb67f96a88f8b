"""Moved to `keras_mfm.backend.torch.adamw` (backend-specific code lives in `keras_mfm.backend`);
this name stays an alias."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("keras_mfm.backend.torch.adamw")
