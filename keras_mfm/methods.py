"""The registry of pre-training methods: name -> builder(encoder, **options) -> keras.Model.

Adding a method is one module with a builder and one `register_method` line; `train.py --help`
lists `available_methods()`.
"""

from keras_mfm.backbones import ResNetBackbone
from keras_mfm.models.mfm import MFM

_METHODS = {}


def register_method(name, description):
    def decorate(builder):
        if name in _METHODS:
            raise ValueError(f"Method {name!r} is registered twice.")
        _METHODS[name] = (builder, description)
        return builder

    return decorate


def available_methods():
    """`{name: one-line description}` of every registered method."""
    return {name: description for name, (_, description) in sorted(_METHODS.items())}


def build_method(name, encoder, **options):
    """Builds the pre-training model `name` around `encoder` (options: the builder's arguments)."""
    if name not in _METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {sorted(_METHODS)}.")
    builder, _ = _METHODS[name]
    return builder(encoder, **options)


def default_p_low(encoder):
    """Authors' probability of a low-pass mask: 0.3 for ResNet-50, 0.5 for ViT."""
    return 0.3 if isinstance(encoder, ResNetBackbone) else 0.5


@register_method("mfm", "Masked Frequency Modeling: predict the masked low/high frequencies")
def build_mfm(encoder, radius=None, p_low=None, masked_loss=True, gamma=1.0, seed=None):
    if p_low is None:
        p_low = default_p_low(encoder)
    return MFM(encoder, radius=radius, p_low=p_low, seed=seed, masked_loss=masked_loss, gamma=gamma, name="mfm")
