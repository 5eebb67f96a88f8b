"""ResNet-50 v1.5 checkpoints (torchvision, timm, MFM) into `ResNetBackbone(variant="v1.5")`: the
weights it needs and their Keras names.
"""


import re

from keras_mfm.interop.common import ConversionError, _CONV, _Target


_RESNET_LAYER = re.compile(r"conv(\d)_block(\d+)_(\d)_(conv|bn)$")


_BN_WEIGHTS = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
               ("running_var", "moving_variance"))


def _torch_resnet_name(layer_name):
    """`conv1_conv` -> `conv1`, `conv3_block2_1_bn` -> `layer2.1.bn1`, `..._0_conv` -> `downsample.0`."""
    if layer_name in ("conv1_conv", "conv1_bn"):
        return "conv1" if layer_name.endswith("conv") else "bn1"
    match = _RESNET_LAYER.match(layer_name)
    if not match:
        return None
    stage, block, index, kind = match.groups()
    prefix = f"layer{int(stage) - 1}.{int(block) - 1}."
    if index == "0":
        return prefix + ("downsample.0" if kind == "conv" else "downsample.1")
    return prefix + f"{kind}{index}"


def _resnet_targets(encoder):
    targets = []
    for layer in encoder.resnet.layers:
        if not layer.weights:
            continue
        name = _torch_resnet_name(layer.name)
        if name is None:
            raise ConversionError(f"No PyTorch name for the Keras layer {layer.name!r}.")  # a bug
        if layer.name.endswith("_conv"):
            targets.append(_Target(f"{name}.weight", layer.kernel, _CONV))
        else:
            targets += [_Target(f"{name}.{t}", getattr(layer, k)) for t, k in _BN_WEIGHTS]
    return targets


def _resnet_depth_check(keys, encoder):
    from keras_mfm.backbones.resnet import RESNET50_STAGES

    blocks = [set() for _ in RESNET50_STAGES]
    for key in keys:
        match = re.match(r"layer([1-4])\.(\d+)\.", key)
        if match:
            blocks[int(match.group(1)) - 1].add(int(match.group(2)))
    found, wanted = tuple(len(b) for b in blocks), tuple(n for _, n, _ in RESNET50_STAGES)
    if found != wanted:
        raise ConversionError(
            f"The checkpoint's ResNet has {found} blocks per stage, ResNetBackbone is a ResNet-50 {wanted}."
        )
