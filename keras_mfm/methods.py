"""The registry of pre-training methods: name -> builder(encoder, **options) -> keras.Model.

Adding a method is one module (its model or corruption layer) and one `@register_method` builder
here; `train.py --help` lists `available_methods()`. A builder's keyword arguments are named like
the fields of `training.PretrainConfig` (and `train.py`'s flags), so a run passes each method
exactly the settings it takes (`method_options`).

| name | corruption / masking | model | loss |
|---|---|---|---|
| mfm | low- or high-pass spectrum mask | MFM | frequency loss on the masked frequencies |
| sr, deblur, denoise | bicubic down/up, Gaussian blur, Gaussian noise | MFM | frequency loss, full spectrum |
| mae | random patches (0.75) | MAE | MSE on masked patches |
| amt, famt | importance-driven masking (0.45) and throwing (0.40) | MAE | MSE on masked patches |
| simmim | random mask units (0.6), mask token | SimMIM | L1 on masked patches |
| simmim_famt | FAMT masking and throwing, mask token | SimMIM | L1 on masked patches |
"""

import dataclasses
import inspect

from keras_mfm.backbones import ResNetBackbone
from keras_mfm.layers.restoration import AdditiveNoise, Downsampling, GaussianBlur
from keras_mfm.models.mae import MAE
from keras_mfm.models.mfm import MFM
from keras_mfm.models.simmim import SimMIM


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name, description: as listed by `available_methods()`.
        builder: `builder(encoder, **options) -> keras.Model` (built by the caller).
        tokens: masks ViT patch tokens, so it needs a ViT encoder.
        importance: keeps an AMT/FAMT importance table (refreshed during training; needs
            `num_images` and the crop geometry of every training image).
        position_embedding: encoder position embedding the method uses (None: the preset's).
        recipe: name of its authors' optimisation recipe (`optimizers.recipes.RECIPES`).
        init: its authors' ViT weight-init scheme (`keras_mfm.layers.initializers`).
        encoder_options: further ViT settings of its authors' pre-training (SimMIM: layer scale
            0.1, drop path 0.1).
    """

    name: str
    description: str
    builder: callable
    tokens: bool = False
    importance: bool = False
    position_embedding: str = None
    recipe: str = "mfm"
    init: str = "mfm"
    encoder_options: tuple = ()  # ((name, value), ...): a hashable dict

    def options(self):
        """Names of the builder's keyword arguments."""
        return [name for name in inspect.signature(self.builder).parameters if name != "encoder"]


_METHODS = {}


def register_method(name, description, tokens=False, importance=False, position_embedding=None, recipe="mfm",
                    init="mfm", encoder_options=None):
    """Decorator registering `builder(encoder, **options)` under `name`."""

    def decorate(builder):
        if name in _METHODS:
            raise ValueError(f"Method {name!r} is registered twice.")
        _METHODS[name] = Method(name, description, builder, tokens, importance, position_embedding, recipe, init,
                                tuple(sorted((encoder_options or {}).items())))
        return builder

    return decorate


def get_method(name):
    """The `Method` registered as `name` (ValueError listing the choices otherwise)."""
    if name not in _METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {sorted(_METHODS)}.")
    return _METHODS[name]


def available_methods():
    """`{name: one-line description}` of every registered method."""
    return {name: method.description for name, method in sorted(_METHODS.items())}


def encoder_defaults(name, backbone="vit"):
    """The encoder settings method `name` pre-trains with (its authors'): for a ViT the init scheme,
    position embedding and `encoder_options`; nothing for a ResNet (timm's network is the default)."""
    method = get_method(name)
    if not backbone.startswith("vit"):
        return {}
    defaults = {"init": method.init, **dict(method.encoder_options)}
    if method.position_embedding:
        defaults["position_embedding"] = method.position_embedding
    return defaults


def build_method(name, encoder, **options):
    """Builds the pre-training model `name` around `encoder` (options: the builder's arguments)."""
    return get_method(name).builder(encoder, **options)


def method_options(name, settings):
    """The builder arguments of method `name` read from `settings` (an object with attributes named
    like the arguments, e.g. a `PretrainConfig`); arguments `settings` lacks keep their defaults."""
    return {option: getattr(settings, option) for option in get_method(name).options() if hasattr(settings, option)}


def default_p_low(encoder):
    """Authors' probability of a low-pass mask: 0.3 for ResNet-50, 0.5 for ViT."""
    return 0.3 if isinstance(encoder, ResNetBackbone) else 0.5


# -- MFM and the restoration baselines (SPEC.md section 1) ---------------------------------------
# A builder's options default to None: "the default of the model or layer it goes to", so that each
# default is written once, in that class's signature (and read from there by `keras_mfm.settings`).
def _given(**options):
    """`options` without those left at None (they keep the default of the class they go to)."""
    return {name: value for name, value in options.items() if value is not None}


def _frequency_model(name, encoder, corruption=None, **options):
    return MFM(encoder, corruption=corruption, name=name, **_given(**options))


@register_method("mfm", "Masked Frequency Modeling: predict the masked low/high frequencies")
def build_mfm(encoder, radius=None, p_low=None, outer_radius=None, radius_range=None, masked_loss=None,
              loss=None, gamma=None, focal=None, focal_alpha=None, focal_log=None, focal_batch=None, seed=None):
    return _frequency_model(
        "mfm", encoder, radius=radius, p_low=default_p_low(encoder) if p_low is None else p_low,
        outer_radius=outer_radius, radius_range=radius_range, masked_loss=masked_loss, loss=loss, gamma=gamma,
        focal=focal, focal_alpha=focal_alpha, focal_log=focal_log, focal_batch=focal_batch, seed=seed,
    )


@register_method("sr", "Super-resolution baseline: restore a bicubic down/up-sampled image (factor 8)")
def build_sr(encoder, sr_factor=None, loss=None, gamma=None, focal=None, focal_alpha=None, focal_log=None,
             focal_batch=None):
    corruption = Downsampling(**_given(factor=sr_factor), name="downsampling")
    return _frequency_model("sr", encoder, corruption, loss=loss, gamma=gamma, focal=focal, focal_alpha=focal_alpha,
                            focal_log=focal_log, focal_batch=focal_batch)


@register_method("deblur", "Deblurring baseline: restore a Gaussian-blurred image (sigma 5 at 224, scaled)")
def build_deblur(encoder, blur_sigma=None, blur_kernel_sizes=None, loss=None, gamma=None, focal=None,
                 focal_alpha=None, focal_log=None, focal_batch=None, seed=None):
    corruption = GaussianBlur(blur_sigma, blur_kernel_sizes, seed=seed, name="gaussian_blur")
    return _frequency_model("deblur", encoder, corruption, loss=loss, gamma=gamma, focal=focal,
                            focal_alpha=focal_alpha, focal_log=focal_log, focal_batch=focal_batch)


@register_method("denoise", "Denoising baseline: restore an image with Gaussian noise (sigma 75/255)")
def build_denoise(encoder, noise_sigma=None, loss=None, gamma=None, focal=None, focal_alpha=None,
                  focal_log=None, focal_batch=None, seed=None):
    corruption = AdditiveNoise(**_given(sigma=noise_sigma), seed=seed, name="additive_noise")
    return _frequency_model("denoise", encoder, corruption, loss=loss, gamma=gamma, focal=focal,
                            focal_alpha=focal_alpha, focal_log=focal_log, focal_batch=focal_batch)


# -- token masking (SPEC.md section 2) -----------------------------------------------------------
def signature_default(cls, name):
    """The default of argument `name` of `cls` (its constructor): the one place that default is written."""
    return inspect.signature(cls.__init__).parameters[name].default


#: Authors' ratios (mask, throw): MAE masks 0.75 and SimMIM 0.6 (their models' defaults); AMT/FAMT
#: mask 0.45 and throw 0.40.
DEFAULT_RATIOS = {
    "mae": (signature_default(MAE, "mask_ratio"), signature_default(MAE, "throw_ratio")),
    "amt": (0.45, 0.40), "famt": (0.45, 0.40),
    "simmim": (signature_default(SimMIM, "mask_ratio"), signature_default(SimMIM, "throw_ratio")),
    "simmim_famt": (0.45, 0.40),
}


def _ratios(name, mask_ratio, throw_ratio):
    default_mask, default_throw = DEFAULT_RATIOS[name]
    return (default_mask if mask_ratio is None else mask_ratio, default_throw if throw_ratio is None else throw_ratio)


def _masked_autoencoder(name, importance):
    def build(encoder, mask_ratio=None, throw_ratio=None, decoder_dim=None, decoder_depth=None, decoder_heads=None,
              norm_pix_loss=None, seed=None, num_images=None, importance_storage=None, importance_location=None):
        mask_ratio, throw_ratio = _ratios(name, mask_ratio, throw_ratio)
        return MAE(
            encoder, mask_ratio=mask_ratio, throw_ratio=throw_ratio, seed=seed, importance=importance,
            num_images=num_images if importance else None, name=name,
            **_given(decoder_dim=decoder_dim, decoder_depth=decoder_depth, decoder_heads=decoder_heads,
                     norm_pix_loss=norm_pix_loss, importance_storage=importance_storage if importance else None,
                     importance_location=importance_location if importance else None),
        )

    return build


# MAE's fixed 2-D sin-cos position embedding, recipe and init
_MAE = dict(tokens=True, position_embedding="sincos", recipe="mae", init="mae")
# SimMIM's ViT-B pre-training config: layer scale 0.1, drop path 0.1, its recipe and init
_SIMMIM = dict(tokens=True, recipe="simmim", init="simmim", encoder_options={"layer_scale": 0.1, "drop_path_rate": 0.1})
build_mae = register_method("mae", "Masked autoencoder: reconstruct randomly masked patches (mask 0.75)", **_MAE)(
    _masked_autoencoder("mae", None))
build_amt = register_method("amt", "AMT: attention-driven masking (0.45) and throwing (0.40) for MAE",
                            importance=True, **_MAE)(_masked_autoencoder("amt", "amt"))
build_famt = register_method("famt", "FAMT: frequency- and attention-driven masking (0.45) and throwing (0.40)",
                             importance=True, **_MAE)(_masked_autoencoder("famt", "famt"))


@register_method("simmim", "SimMIM: mask tokens at the encoder input, L1 on masked pixels (mask 0.6)", **_SIMMIM)
def build_simmim(encoder, mask_ratio=None, mask_patch_size=None, seed=None):
    mask_ratio, _ = _ratios("simmim", mask_ratio, None)
    return SimMIM(encoder, mask_ratio=mask_ratio, mask_patch_size=mask_patch_size, seed=seed, name="simmim")


@register_method("simmim_famt", "SimMIM with FAMT masking (0.45) and throwing (0.40)", importance=True, **_SIMMIM)
def build_simmim_famt(encoder, mask_ratio=None, throw_ratio=None, seed=None, num_images=None, importance_storage=None,
                      importance_location=None):
    mask_ratio, throw_ratio = _ratios("simmim_famt", mask_ratio, throw_ratio)
    return SimMIM(encoder, mask_ratio=mask_ratio, throw_ratio=throw_ratio, seed=seed, importance="famt",
                  num_images=num_images, name="simmim_famt",
                  **_given(importance_storage=importance_storage, importance_location=importance_location))
