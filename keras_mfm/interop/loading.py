"""Loading a state dict into an encoder (`load_torch_state_dict`) and building the encoder of a
checkpoint (`convert_checkpoint`): every check passes before anything is assigned.
"""


import os
import re
import warnings

import numpy as np

from keras_mfm.interop.common import ConversionError, ConversionReport, _group, _to_keras
from keras_mfm.interop.reading import (_DESCRIPTIONS, _NAMES, _select, _to_numpy, checkpoint_architecture,
                                       find_state_dict, read_checkpoint)
from keras_mfm.interop.resnet import _resnet_depth_check, _resnet_targets
from keras_mfm.interop.vit import _grid_side, _vit_depth_check, _vit_position_embedding, _vit_rewrite, _vit_targets


def _check_architecture(names, cls, variant=None):
    """`"vit"` or `"resnet"`: what an encoder of class `cls` loads, if the checkpoint keys `names` fit it."""
    from keras_mfm.backbones import ResNetBackbone, ViTBackbone

    if issubclass(cls, ViTBackbone):
        architecture = "vit"
    elif issubclass(cls, ResNetBackbone):
        architecture = "resnet"
    else:
        raise ConversionError(f"Cannot load PyTorch weights into a {cls.__name__}: pass a ViTBackbone "
                              "or a ResNetBackbone(variant='v1.5').")
    found = checkpoint_architecture(names)
    if found != architecture:
        holds = _DESCRIPTIONS.get(found, "no known architecture (no patch_embed / blocks.N or conv1 / layerN keys)")
        raise ConversionError(
            f"The checkpoint holds {holds}, but the encoder is a {cls.__name__} (a {_NAMES[architecture]}); "
            f"first keys: {', '.join(list(names)[:5])}."
        )
    if architecture == "resnet" and variant != "v1.5":
        raise ConversionError(
            "The encoder is Keras' ResNet-50 v1 (preset resnet50_v1), but PyTorch (torchvision / timm / "
            "MFM) ResNet-50 checkpoints are v1.5: their downsampling blocks stride in the 3x3 "
            "convolution, not in the first 1x1, so their weights give other features in v1. Use "
            "--backbone resnet50 (ResNetBackbone(variant='v1.5'))."
        )
    return architecture


def _inside_encoder(key, architecture):
    """Whether an unmapped key belongs to a module the encoder has (then it would change features)."""
    if architecture == "vit":
        return key.startswith(("blocks.", "patch_embed."))
    return re.match(r"(conv1|bn1|layer[1-4])(\.|$)", key) is not None


def _shape_error(mismatches, encoder):
    shown = "; ".join(f"{key}: checkpoint {got}, encoder {want}" for key, got, want in mismatches[:5])
    more = f" (and {len(mismatches) - 5} more)" if len(mismatches) > 5 else ""
    shapes = {key: (got, want) for key, got, want in mismatches}
    hint = ""
    if "patch_embed.proj.weight" in shapes:
        got, want = shapes["patch_embed.proj.weight"]
        if len(got) == 4 and got[:2] == want[:2]:
            hint = f" (the checkpoint's patch size is {got[2]}: --patch-size {got[2]})"
    elif "pos_embed" in shapes and len(shapes) == 1:
        got, want = shapes["pos_embed"]
        side = (_grid_side(got[1] - 1) or _grid_side(got[1])) if len(got) == 3 else None
        if side and got[2] == want[2]:
            height, width = encoder.grid_size
            hint = (f" (the checkpoint's {side}x{side} patch grid is not the encoder's {height}x{width}: another "
                    "image size; pass interpolate_position_embedding=True (--interpolate-position-embedding) "
                    "to resample it)")
    return ConversionError(f"Shape mismatch (PyTorch layout): {shown}{more}{hint}.")


def load_torch_state_dict(encoder, state_dict, prefix=None, interpolate_position_embedding=False, strict=True):
    """Copies a PyTorch state dict into a keras_mfm encoder; returns a `ConversionReport`.

    Args:
        encoder: a `ViTBackbone`, or a `ResNetBackbone(variant="v1.5")`.
        state_dict: `{name: tensor or array}`, or a checkpoint holding one (`{"model": ...}`, ...).
        prefix: keep only the keys under this prefix (default: `encoder.` or `backbone.` if present).
        interpolate_position_embedding: resample a `pos_embed` of another patch grid.
        strict: missing keys are an error (default); with False they keep their initial values
            and are reported.

    Nothing is assigned unless every check passes. Unused keys are reported and warned about.
    """
    state_dict = find_state_dict(state_dict)
    names, unused = _select(state_dict, prefix)
    architecture = _check_architecture(names, type(encoder), getattr(encoder, "variant", None))
    encoder.ensure_built()
    if architecture == "vit":
        _vit_depth_check(names, encoder)
    else:
        _resnet_depth_check(names, encoder)

    arrays = {key: _to_numpy(state_dict[original]) for key, original in names.items()
              if not key.endswith("num_batches_tracked")}
    used = {key: [names[key]] for key in arrays}
    notes = []
    if architecture == "vit":
        _vit_rewrite(arrays, used, notes, encoder)
        targets = _vit_targets(encoder)
    else:
        targets = _resnet_targets(encoder)

    assignments, missing, mismatches = [], [], []
    for target in targets:
        if target.key not in arrays:
            missing.append(target.key)
            continue
        array = arrays.pop(target.key)
        if target.key == "pos_embed":
            array = _vit_position_embedding(array, encoder, interpolate_position_embedding, notes)
        value = _to_keras(array, target.layout)
        if tuple(value.shape) != tuple(target.variable.shape):
            mismatches.append((target.key, tuple(array.shape), target.torch_shape()))
            continue
        assignments.append((target, value))

    foreign = sorted(key for key in arrays if _inside_encoder(key, architecture))
    if foreign:
        hint = ""
        if any(k.endswith("attn.qkv.bias") for k in foreign):
            hint = " (the checkpoint has qkv biases: build the encoder with qkv_bias=True)"
        raise ConversionError(
            f"The checkpoint has parameters the {type(encoder).__name__} has no place for{hint}: "
            f"{', '.join(foreign[:6])}{' ...' if len(foreign) > 6 else ''}."
        )
    if mismatches:
        raise _shape_error(mismatches, encoder)
    if missing and strict:
        hint = ""
        if any(k.endswith("attn.qkv.bias") for k in missing):
            hint = " (a checkpoint without qkv biases needs qkv_bias=False, --no-qkv-bias)"
        elif "norm.weight" in missing and "fc_norm.weight" in arrays:
            hint = (" (the checkpoint has fc_norm, a LayerNorm applied after average pooling, as in "
                    "global-pool fine-tuned classifiers; ViTBackbone normalises each token instead and "
                    "cannot give the same features)")
        raise ConversionError(
            f"The checkpoint lacks {len(missing)} weights the encoder needs{hint}: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}."
        )

    broken = [target.key for target, value in assignments
              if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()]
    if broken:
        raise ConversionError(
            f"The checkpoint has NaN or infinite values in {len(broken)} weights ({', '.join(broken[:6])}"
            f"{' ...' if len(broken) > 6 else ''}): it is damaged or was saved from a diverged run."
        )
    for target, value in assignments:
        target.variable.assign(value.astype(target.variable.dtype))
    loaded = sorted({original for target, _ in assignments for original in used[target.key]})
    unused = sorted(unused + [original for key in arrays for original in used[key]])
    report = ConversionReport(architecture, loaded, unused, missing, notes)
    if unused:
        warnings.warn(f"{len(unused)} checkpoint keys were not loaded into the encoder: {_group(unused)}.",
                      stacklevel=2)
    if missing:
        warnings.warn(f"{len(missing)} encoder weights were not in the checkpoint and keep their initial "
                      f"values: {_group(missing)}.", stacklevel=2)
    return report


def convert_checkpoint(checkpoint, backbone="vit_base", image_size=224, patch_size=None, *, prefix=None,
                       interpolate_position_embedding=False, strict=True, return_report=False,
                       **backbone_kwargs):
    """A keras_mfm encoder with the weights of a PyTorch checkpoint.

    Args:
        checkpoint: the path of a `.pth` file (`read_checkpoint`), or a loaded checkpoint or state dict.
        backbone: a preset name (`vit_tiny`, `vit_small`, `vit_base`, `resnet50` = `resnet50_v1_5`) built with
            `get_backbone(backbone, image_size, patch_size, **backbone_kwargs)` (e.g. `depth=6`,
            `num_heads=...`, `qkv_bias=False`, `position_embedding="sincos"`), or a `Backbone`.
        prefix, interpolate_position_embedding, strict: see `load_torch_state_dict`.
        return_report: also return the `ConversionReport`.

    Returns:
        the encoder, or `(encoder, report)`.
    """
    from keras_mfm.backbones import BACKBONE_PRESETS, Backbone, get_backbone

    source = None
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        checkpoint = read_checkpoint(source)
    if isinstance(backbone, Backbone):
        if patch_size is not None or backbone_kwargs:
            raise ValueError("patch_size and backbone arguments only apply to a preset name.")
        encoder = backbone
    else:
        if backbone in BACKBONE_PRESETS:  # check the checkpoint before building a large model
            cls, preset = BACKBONE_PRESETS[backbone]
            names, _ = _select(find_state_dict(checkpoint), prefix)
            _check_architecture(names, cls, backbone_kwargs.get("variant", preset.get("variant", "v1")))
        encoder = get_backbone(backbone, image_size, patch_size=patch_size, **backbone_kwargs)
    report = load_torch_state_dict(encoder, checkpoint, prefix=prefix, strict=strict,
                                   interpolate_position_embedding=interpolate_position_embedding)
    report.source = source
    return (encoder, report) if return_report else encoder
