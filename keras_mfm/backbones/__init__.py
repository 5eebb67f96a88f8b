"""Encoders and their presets.

    encoder = keras_mfm.backbones.get_backbone("vit_tiny", image_size=32, patch_size=4)
"""

from keras_mfm.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone
from keras_mfm.backbones.resnet import ResNetBackbone
from keras_mfm.backbones.vit import ViTBackbone
from keras_mfm.backbones.wrapped import KerasEncoder, as_encoder

#: name -> (class, keyword arguments). ViT presets take any patch size (default 16).
BACKBONE_PRESETS = {
    "vit_tiny": (ViTBackbone, {"hidden_dim": 192, "depth": 12, "num_heads": 3}),
    "vit_small": (ViTBackbone, {"hidden_dim": 384, "depth": 12, "num_heads": 6}),
    "vit_base": (ViTBackbone, {"hidden_dim": 768, "depth": 12, "num_heads": 12}),
    "resnet50": (ResNetBackbone, {"variant": "v1.5"}),  # timm's (MFM's): v1.5, last BN of each block at 0
    "resnet50_v1_5": (ResNetBackbone, {"variant": "v1.5"}),  # the same network, by its variant's name
    "resnet50_v1": (ResNetBackbone, {"variant": "v1"}),  # Keras' application, ResNet v1
}


def get_backbone(name, image_size=224, patch_size=None, **kwargs):
    """Builds a preset encoder by name.

    Args:
        name: one of `BACKBONE_PRESETS` (`vit_tiny`, `vit_small`, `vit_base`, `resnet50` = `resnet50_v1_5`
            (timm's v1.5, MFM's), `resnet50_v1` (Keras' application)).
        image_size: int or (H, W).
        patch_size: ViT patch size (default 16); must be None for ResNet-50.
        **kwargs: overrides of the preset's arguments (e.g. `depth=6`, `drop_path_rate=0.1`).
    """
    if name not in BACKBONE_PRESETS:
        raise ValueError(
            f"Unknown backbone {name!r}; choose one of {sorted(BACKBONE_PRESETS)}."
        )
    cls, preset = BACKBONE_PRESETS[name]
    model_name = kwargs.pop("name", name)
    arguments = dict(preset, **kwargs)
    if cls is ViTBackbone:
        arguments["patch_size"] = 16 if patch_size is None else patch_size
    elif patch_size is not None:
        raise ValueError(f"Backbone {name!r} has no patch size (got patch_size={patch_size}).")
    return cls(image_size=image_size, name=model_name, **arguments)


__all__ = [
    "BACKBONE_PRESETS",
    "Backbone",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KerasEncoder",
    "ResNetBackbone",
    "ViTBackbone",
    "as_encoder",
    "get_backbone",
]
