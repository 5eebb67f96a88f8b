"""Pre-training models."""

from keras_mfm.models.mfm import MFM, PixelShuffleHead

__all__ = ["MFM", "PixelShuffleHead"]
