"""Pre-training models and the classifier used to evaluate encoders."""

from keras_mfm.models.classifier import ImageClassifier
from keras_mfm.models.mae import MAE, MAEDecoder
from keras_mfm.models.mfm import MFM, PixelShuffleHead
from keras_mfm.models.simmim import SimMIM
from keras_mfm.models.token_masking import TokenMaskingModel

__all__ = ["ImageClassifier", "MAE", "MAEDecoder", "MFM", "PixelShuffleHead", "SimMIM", "TokenMaskingModel"]
