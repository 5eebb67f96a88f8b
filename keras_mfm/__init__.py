"""keras_mfm: frequency-domain and attention-guided masked image modeling in Keras 3."""

__version__ = "0.1.0"

from keras_mfm import backbones, frequency, layers, models  # noqa: E402

__all__ = ["backbones", "frequency", "layers", "models", "__version__"]
