"""Moved to `keras_mfm.backend` (backend-specific code lives there); this name stays an alias."""

from keras_mfm.backend import input_gradient  # noqa: F401
