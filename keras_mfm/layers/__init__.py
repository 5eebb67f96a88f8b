"""Keras layers of keras_mfm."""

from keras_mfm.layers.frequency_masking import FrequencyMasking
from keras_mfm.layers.transformer import MultiHeadSelfAttention, TransformerBlock

__all__ = ["FrequencyMasking", "MultiHeadSelfAttention", "TransformerBlock"]
