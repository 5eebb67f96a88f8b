"""Keras layers of keras_mfm."""

from keras_mfm.layers.frequency_masking import FrequencyMasking
from keras_mfm.layers.fused import BatchNormalization, Conv2D, Dense, LayerNormalization
from keras_mfm.layers.restoration import AdditiveNoise, Downsampling, GaussianBlur, RestorationCorruption
from keras_mfm.layers.transformer import MultiHeadSelfAttention, TransformerBlock

__all__ = [
    "AdditiveNoise",
    "BatchNormalization",
    "Conv2D",
    "Dense",
    "Downsampling",
    "FrequencyMasking",
    "GaussianBlur",
    "LayerNormalization",
    "MultiHeadSelfAttention",
    "RestorationCorruption",
    "TransformerBlock",
]
