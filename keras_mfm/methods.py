"""The registry of pre-training methods: name -> builder(encoder, **options) -> keras.Model.

Adding a method is one module with a builder and one `register_method` line; `train.py --help`
lists `available_methods()`.
"""

from keras_mfm.backbones import ResNetBackbone
from keras_mfm.models.mae import MAE
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


#: Authors' ratios (SPEC.md section 2): MAE masks 0.75; AMT/FAMT mask 0.45 and throw 0.40.
DEFAULT_RATIOS = {"mae": (0.75, 0.0), "amt": (0.45, 0.40), "famt": (0.45, 0.40)}


def _masked_autoencoder(name, importance):
    def build(encoder, mask_ratio=None, throw_ratio=None, decoder_dim=512, decoder_depth=8, decoder_heads=16,
              norm_pix_loss=False, seed=None, num_images=None):
        default_mask, default_throw = DEFAULT_RATIOS[name]
        return MAE(
            encoder, mask_ratio=default_mask if mask_ratio is None else mask_ratio,
            throw_ratio=default_throw if throw_ratio is None else throw_ratio, decoder_dim=decoder_dim,
            decoder_depth=decoder_depth, decoder_heads=decoder_heads, norm_pix_loss=norm_pix_loss, seed=seed,
            importance=importance, num_images=num_images if importance else None, name=name,
        )

    return build


build_mae = register_method("mae", "Masked autoencoder: reconstruct randomly masked patches (mask 0.75)")(
    _masked_autoencoder("mae", None))
build_amt = register_method("amt", "AMT: attention-driven masking (0.45) and throwing (0.40) for MAE")(
    _masked_autoencoder("amt", "amt"))
build_famt = register_method("famt", "FAMT: frequency- and attention-driven masking (0.45) and throwing (0.40)")(
    _masked_autoencoder("famt", "famt"))
