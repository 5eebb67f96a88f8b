"""Import PyTorch checkpoints (timm / MAE / MFM / SimMIM ViTs, torchvision / timm / MFM ResNet-50)
into keras_mfm encoders.

    python -m keras_mfm.convert mae_pretrain_vit_base.pth --backbone vit_base --image-size 224 \\
        --patch-size 16 --output encoder.keras
    python -m keras_mfm.convert mfm_resnet50.pth --backbone resnet50_v1_5 --image-size 224 --output encoder.keras

    from keras_mfm.convert import convert_checkpoint, load_torch_state_dict
    encoder, report = convert_checkpoint("ckpt.pth", "vit_base", image_size=224, patch_size=16,
                                         return_report=True)
    report = load_torch_state_dict(encoder, state_dict)      # into an existing encoder

The written `encoder.keras` is like train.py's: `eval.py linear --encoder encoder.keras ...`.

Reading: `torch.load(path, map_location="cpu", weights_only=True)` (no code from the file runs).
Training checkpoints that also pickle plain Python objects (MAE's `args` Namespace, NumPy scalars)
are read with inert stand-ins for those objects, and the configuration dicts some of them pickle
(yacs' `CfgNode` in MFM's released files, `EasyDict`, `AttrDict`) as plain ordered dicts; a file
whose objects cannot be rebuilt that way is refused with a one-line recipe. `.safetensors` files
(timm, Hugging Face) are read with the `safetensors` package. The state
dict is found inside `{"model": ...}`, `{"state_dict": ...}` or `{"module": ...}`; the prefix
`module.` (DDP) is removed, and when keys start with `encoder.` (MFM, SimMIM) or `backbone.` only
those are loaded: everything else (the decoder) is reported as unused. `prefix=` picks another one.

What maps to what (`i` a block; `s` = 1..4 a stage, `j` a block of it, `k` = 1..3):

    ViT (`ViTBackbone`)                         Keras weight                    layout
    cls_token (1, 1, D)                         cls_token                       as is
    pos_embed (1, 1 + N, D)                     position_embedding              as is (1)
    patch_embed.proj.weight (D, 3, p, p), .bias patch_embedding kernel, bias    OIHW -> HWIO
    blocks.i.norm1 / .norm2 .weight, .bias      block_i norm1 / norm2 gamma, beta
    blocks.i.attn.qkv.weight (3D, D), .bias     block_i attention.qkv kernel, bias   transposed (2)
    blocks.i.attn.proj .weight, .bias           block_i attention.proj          transposed (3)
    blocks.i.mlp.fc1 / .fc2 .weight, .bias      block_i fc1 / fc2               transposed (3)
    norm.weight, .bias                          norm gamma, beta

    ResNet-50 v1.5 (`ResNetBackbone(variant="v1.5")`, preset `resnet50_v1_5`)
    conv1.weight                                conv1_conv kernel               OIHW -> HWIO
    bn1.weight, .bias, .running_mean, .running_var   conv1_bn gamma, beta, moving_mean, moving_variance
    layer{s}.{j}.conv{k}.weight / .bn{k}.*      conv{s+1}_block{j+1}_{k}_conv / _bn
    layer{s}.{j}.downsample.0.weight / .1.*     conv{s+1}_block{j+1}_0_conv / _0_bn

(1) a `pos_embed` without the [CLS] slot, (1, N, D) (timm's `no_embed_class`), gets a zero row for
[CLS]; with `interpolate_position_embedding=True` a different square patch grid is resampled
bicubically (PyTorch's `F.interpolate(mode="bicubic", align_corners=False)`, as MAE does; computed
in NumPy), otherwise it is a shape error. (2) BEiT-style checkpoints (MFM, SimMIM) keep
`attn.q_bias` and `attn.v_bias` and no k bias: the qkv bias becomes `[q_bias, 0, v_bias]`.
(3) Layer scale (`blocks.i.gamma_1`/`gamma_2`, timm's `ls1.gamma`/`ls2.gamma`) multiplies the
output of `attn.proj` / `mlp.fc2`; it is folded into their weights and biases (exact up to float
rounding). `num_batches_tracked` is ignored.

Reported as unused (a warning, and `ConversionReport.unused`): MAE's `mask_token` and `decoder_*`,
MFM's / SimMIM's `decoder.*` (and SimMIM's `encoder.mask_token`), classifier heads (`head.*`,
`fc.*`), and anything else outside the encoder's modules.

Same features: our ViT and timm's / MAE's / MFM's agree in every choice that matters, so converted
features equal PyTorch's up to float32 rounding: LayerNorm epsilon 1e-6 (timm's default, and
MAE's and MFM's `partial(nn.LayerNorm, eps=1e-6)`), exact (erf) GELU (`nn.GELU()`), the fused qkv
laid out as (3, heads, head_dim) along its output axis, scale head_dim ** -0.5, patches row-major,
[CLS] first with its own position slot. Neither `num_heads` nor the LayerNorm epsilon is stored in
the weights: they must be those of the checkpoint's model (the presets have the standard 3 / 6 / 12
heads; pass `layer_norm_epsilon=1e-5` for a ViT built with `nn.LayerNorm`'s default). Global-pool
classifiers (`fc_norm` instead of `norm`: LayerNorm after average pooling) cannot be represented
and are refused. ResNet-50: Keras' `resnet50_v1` (v1) is another network than torchvision's (v1.5,
see `keras_mfm.backbones.resnet`) and is refused; `resnet50` (= `resnet50_v1_5`) gives PyTorch's features up to
float32 rounding. Caffe-style v1 checkpoints (stride in the first 1x1) have the same key names and
shapes as v1.5 ones and cannot be told apart: they would load, with other features.
tests/test_convert.py measures the differences against float64 PyTorch references.

Errors are `ConversionError` (a `ValueError`), one line each: a missing, truncated or corrupt file
(naming it), a checkpoint of another architecture (a ResNet state dict for a ViT, a Swin, ...), a
different depth, a shape mismatch (the key, the checkpoint's shape and the one the encoder needs,
both in PyTorch's layout), missing keys (listed), parameters inside the encoder's modules that it
has no place for (e.g. q/k norms, relative position biases). The command line prints
`convert: error: ...` and exits with code 2.
"""

import argparse
import dataclasses
import os
import pickle
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from keras_mfm import cli
from keras_mfm.cli import BACKENDS

CONTAINER_KEYS = ("state_dict", "model", "module")
ENCODER_PREFIXES = ("encoder.", "backbone.")
#: top-level ViT parameters of architectures ViTBackbone does not have
UNSUPPORTED_VIT = {
    "norm_pre": "a LayerNorm before the blocks (CLIP-style)",
    "reg_token": "register tokens",
    "dist_token": "a distillation token (DeiT)",
    "rel_pos_bias": "a shared relative position bias (BEiT)",
    "patch_embed.norm": "a LayerNorm after the patch embedding",
}
_LINEAR, _CONV = "linear", "conv"  # (out, in) -> (in, out); OIHW -> HWIO


class ConversionError(ValueError):
    """A checkpoint that cannot be read, or does not fit the encoder."""


@dataclasses.dataclass
class ConversionReport:
    """What `load_torch_state_dict` did.

    `loaded`: checkpoint keys read into the encoder; `unused`: keys it does not need (decoder,
    heads, mask token), with their names in the file; `missing`: keys the encoder needed and did
    not get (only with `strict=False`: otherwise an error); `notes`: transformations beyond the
    layout (folded layer scale, split q/v biases, resampled position embedding).
    """

    architecture: str
    loaded: list = dataclasses.field(default_factory=list)
    unused: list = dataclasses.field(default_factory=list)
    missing: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    source: str = None

    def summary(self):
        """One line: counts, unused keys grouped by their first name component, notes."""
        text = f"{self.architecture}: {len(self.loaded)} tensors loaded"
        if self.unused:
            text += f", {len(self.unused)} unused ({_group(self.unused)})"
        if self.missing:
            text += f", {len(self.missing)} missing ({_group(self.missing)})"
        if self.notes:
            text += "; " + "; ".join(self.notes)
        return text


def _group(keys, limit=6):
    """`decoder_blocks.0.norm1.weight`, ... -> `decoder_blocks x96, fc x2, mask_token`."""
    counts = {}
    for key in keys:
        parts = key.split(".")[:-1] or [key]  # the module, up to its first index
        index = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts))
        head = ".".join(parts[:max(index, 1)])
        counts[head] = counts.get(head, 0) + 1
    parts = [f"{head} x{n}" if n > 1 else head for head, n in counts.items()]
    return ", ".join(parts[:limit]) + (f", ... ({len(parts) - limit} more)" if len(parts) > limit else "")


# -- reading the file -------------------------------------------------------------------------------
class _Inert:
    """Stands in for a pickled Python object of a training checkpoint (arguments, configs, NumPy
    scalars): accepts any construction and state, runs no code from the file, holds nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


#: dict subclasses that training scripts pickle as their configuration (MFM: yacs' CfgNode); read as
#: plain ordered dicts, since torch.load(weights_only=True) fills only real dicts with items
DICT_CONFIG_CLASSES = ("CfgNode", "EasyDict", "AttrDict")


def _stand_in(name):
    """The inert class read in place of the pickled class `name` ("module.Class")."""
    if name.rsplit(".", 1)[-1] in DICT_CONFIG_CLASSES:
        return OrderedDict
    return type(name.rsplit(".", 1)[-1], (_Inert,), {})


def _first_line(error):
    return (str(error).strip().splitlines() or [""])[0][:200]


def read_checkpoint(path):
    """The object in a PyTorch checkpoint file, read with `torch.load(weights_only=True)`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"No checkpoint file at {path}.")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    import torch

    def corrupt(error):
        return ConversionError(
            f"Cannot read the checkpoint file {path}: it is corrupt, truncated or not a PyTorch "
            f"checkpoint ({type(error).__name__}: {_first_line(error)})."
        )

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refusal = error
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ... on bad files
        raise corrupt(error) from error
    # weights_only refused (or the pickle is garbage): which Python objects does the file hold?
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as error:  # noqa: BLE001
        raise corrupt(error) from error
    if not names:
        raise corrupt(refusal) from refusal
    stand_ins = [(_stand_in(name), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise ConversionError(
            f"{path} pickles Python objects ({', '.join(names[:4])}) that torch.load(weights_only=True) "
            "will not rebuild; if you trust the file, save its state dict alone and convert that: "
            f"torch.save(torch.load(PATH, weights_only=False)['model'], 'weights.pth')."
        ) from error


def read_safetensors(path):
    """The `{name: tensor}` dict of a `.safetensors` file (no pickle: nothing in it can run)."""
    try:
        import safetensors
    except ImportError:
        raise ConversionError(
            f"Reading {path} needs the safetensors package: pip install safetensors (or keras-mfm[safetensors])."
        ) from None
    try:  # PyTorch tensors when PyTorch is installed (bfloat16 has no NumPy dtype), else NumPy arrays
        import torch  # noqa: F401

        framework = "pt"
    except ImportError:
        framework = "numpy"
    try:
        with safetensors.safe_open(path, framework=framework) as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        raise ConversionError(
            f"Cannot read the safetensors file {path}: it is corrupt or truncated "
            f"({type(error).__name__}: {_first_line(error)})."
        ) from error


def _is_tensor(value):
    return hasattr(value, "shape") and hasattr(value, "dtype")


def find_state_dict(checkpoint):
    """The `{name: tensor}` dict inside a checkpoint (`{"model": ...}`, `{"state_dict": ...}`, ...)."""
    current = checkpoint
    for _ in range(4):
        if not isinstance(current, Mapping):
            break
        if current and all(isinstance(k, str) and _is_tensor(v) for k, v in current.items()):
            return dict(current)
        inner = next((current[k] for k in CONTAINER_KEYS if isinstance(current.get(k), Mapping)), None)
        if inner is None:
            break
        current = inner
    if isinstance(checkpoint, Mapping):
        what = f"a dict with the keys {', '.join(map(str, list(checkpoint)[:8]))}"
    else:
        what = f"a {type(checkpoint).__name__}"
    raise ConversionError(
        f"The checkpoint holds {what}, not a state dict (a dict of tensors, possibly under "
        f"{', '.join(repr(k) for k in CONTAINER_KEYS)})."
    )


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _select(state_dict, prefix=None):
    """`({key without prefix: original key}, [unused original keys])` (see the module docstring)."""
    names = {key: key for key in state_dict}
    unused = []
    explicit = prefix and any(key.startswith(prefix) for key in names)  # e.g. "module.encoder."
    if not explicit and names and all(key.startswith("module.") for key in names):
        names = {key[len("module."):]: original for key, original in names.items()}
    prefixes = [prefix] if prefix else list(ENCODER_PREFIXES)
    for candidate in prefixes:
        if candidate and any(key.startswith(candidate) for key in names):
            unused = [original for key, original in names.items() if not key.startswith(candidate)]
            names = {key[len(candidate):]: original for key, original in names.items() if key.startswith(candidate)}
            break
    else:
        if prefix:
            raise ConversionError(f"No checkpoint key starts with the prefix {prefix!r}.")
    return names, unused


def checkpoint_architecture(keys):
    """`"vit"`, `"resnet"`, `"swin"` or None, from the (prefix-free) key names."""
    keys = list(keys)
    if any(re.match(r"layers\.\d+\.blocks\.", k) for k in keys):
        return "swin"
    if any(re.match(r"blocks\.\d+\.", k) for k in keys) or "patch_embed.proj.weight" in keys:
        return "vit"
    if any(re.match(r"layer[1-4]\.\d+\.", k) for k in keys) or "conv1.weight" in keys:
        return "resnet"
    return None


_NAMES = {"vit": "ViT", "resnet": "ResNet"}
_DESCRIPTIONS = {
    "vit": "a ViT (timm / MAE / MFM key names: patch_embed, blocks.N)",
    "resnet": "a ResNet (torchvision / timm key names: conv1, layer1..layer4)",
    "swin": "a Swin Transformer (layers.N.blocks.M), which keras_mfm has no encoder for",
}


# -- the weights each encoder needs -----------------------------------------------------------------
@dataclasses.dataclass
class _Target:
    key: str  # checkpoint key (without prefix)
    variable: object  # keras variable
    layout: str = None  # None, _LINEAR or _CONV

    def torch_shape(self):
        shape = tuple(self.variable.shape)
        if self.layout == _LINEAR:
            return shape[::-1]
        if self.layout == _CONV:
            return (shape[3], shape[2], shape[0], shape[1])
        return shape


def _to_keras(array, layout):
    if layout == _LINEAR:
        return array.T
    if layout == _CONV:
        return array.transpose(2, 3, 1, 0)
    return array


def _vit_targets(encoder):
    def dense(key, layer):
        out = [_Target(f"{key}.weight", layer.kernel, _LINEAR)]
        return out + ([_Target(f"{key}.bias", layer.bias)] if layer.use_bias else [])

    def norm(key, layer):
        return [_Target(f"{key}.weight", layer.gamma), _Target(f"{key}.bias", layer.beta)]

    targets = [
        _Target("cls_token", encoder.cls_token),
        _Target("pos_embed", encoder.position_embedding),
        _Target("patch_embed.proj.weight", encoder.patch_embedding.kernel, _CONV),
        _Target("patch_embed.proj.bias", encoder.patch_embedding.bias),
    ]
    for i, block in enumerate(encoder.blocks):
        targets += norm(f"blocks.{i}.norm1", block.norm1) + dense(f"blocks.{i}.attn.qkv", block.attention.qkv)
        targets += dense(f"blocks.{i}.attn.proj", block.attention.proj) + norm(f"blocks.{i}.norm2", block.norm2)
        targets += dense(f"blocks.{i}.mlp.fc1", block.fc1) + dense(f"blocks.{i}.mlp.fc2", block.fc2)
    return targets + norm("norm", encoder.norm)


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


# -- ViT specifics -------------------------------------------------------------------------------
def _vit_depth_check(keys, encoder):
    depth = len({int(m.group(1)) for m in (re.match(r"blocks\.(\d+)\.", k) for k in keys) if m})
    if depth != encoder.depth:
        raise ConversionError(
            f"The checkpoint has {depth} transformer blocks, the encoder {encoder.depth}: build it "
            f"with depth={depth} (--depth {depth})."
        )
    for name, what in UNSUPPORTED_VIT.items():
        if any(k == name or k.startswith(name + ".") for k in keys):
            raise ConversionError(f"The checkpoint's ViT has {what} ({name}), which ViTBackbone does not have.")


def _vit_rewrite(arrays, used, notes, encoder):
    """BEiT's q/v biases -> one qkv bias; layer scale folded into attn.proj / mlp.fc2."""
    split, folded = 0, 0
    for i in range(encoder.depth):
        b = f"blocks.{i}."
        if b + "attn.q_bias" in arrays and b + "attn.qkv.bias" not in arrays:
            q, v = arrays.pop(b + "attn.q_bias"), arrays.pop(b + "attn.v_bias", None)
            if v is None:
                raise ConversionError(f"{b}attn.q_bias has no {b}attn.v_bias beside it.")
            arrays[b + "attn.qkv.bias"] = np.concatenate([q, np.zeros_like(q), v])
            used[b + "attn.qkv.bias"] = used.pop(b + "attn.q_bias") + used.pop(b + "attn.v_bias")
            split += 1
        for scales, layer in (((b + "gamma_1", b + "ls1.gamma"), b + "attn.proj"),
                              ((b + "gamma_2", b + "ls2.gamma"), b + "mlp.fc2")):
            scale_key = next((k for k in scales if k in arrays), None)
            if scale_key is None:
                continue
            gamma = arrays.pop(scale_key)
            for suffix, weight_key in (("weight", layer + ".weight"), ("bias", layer + ".bias")):
                if weight_key not in arrays:
                    continue  # reported as missing later
                value = arrays[weight_key]
                if value.shape[0] != gamma.shape[0]:
                    raise ConversionError(
                        f"{scale_key}: checkpoint shape {gamma.shape} does not scale {weight_key} {value.shape}."
                    )
                arrays[weight_key] = value * (gamma[:, None] if suffix == "weight" else gamma)
                used[weight_key] = used[weight_key] + used[scale_key]
            used.pop(scale_key)
            folded += 1
    if split:
        notes.append(f"qkv biases from q_bias, 0, v_bias in {split} blocks")
    if folded:
        notes.append(f"layer scale folded into attn.proj / mlp.fc2 ({folded} scales)")


def _bicubic_matrix(in_size, out_size):
    """`(out, in)` weights of PyTorch's bicubic resampling (a = -0.75, align_corners=False,
    border samples repeated), so that `out = W @ in` along one axis."""
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = np.zeros((out_size, in_size))
    scale = in_size / out_size
    for o in range(out_size):
        source = scale * (o + 0.5) - 0.5
        base = int(np.floor(source))
        t = source - base
        for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            weights[o, min(max(base + offset, 0), in_size - 1)] += w
    return weights


def resample_position_embedding(table, grid_size):
    """`(1, [1 +] h * w, D)` -> `(1, [1 +] H * W, D)` for `grid_size = (H, W)`, bicubically (as MAE's
    `interpolate_pos_embed`); the [CLS] row, when present (`h * w + 1` rows), is kept."""
    rows = table.shape[1]
    side = int(round(np.sqrt(rows - 1)))
    has_cls = side * side == rows - 1
    if not has_cls:
        side = int(round(np.sqrt(rows)))
        if side * side != rows:
            raise ConversionError(f"pos_embed {table.shape}: its {rows} positions are not a square patch grid.")
    cls, grid = (table[:, :1], table[:, 1:]) if has_cls else (table[:, :0], table)
    grid = grid[0].reshape(side, side, -1).astype("float64")
    grid = np.einsum("Hh,hwd,Ww->HWd", _bicubic_matrix(side, grid_size[0]), grid, _bicubic_matrix(side, grid_size[1]))
    return np.concatenate([cls, grid.reshape(1, -1, grid.shape[-1]).astype(table.dtype)], axis=1)


def _grid_side(count):
    side = int(round(np.sqrt(count))) if count > 0 else 0
    return side if side > 0 and side * side == count else None


def _vit_position_embedding(array, encoder, interpolate, notes):
    """The checkpoint's `pos_embed` as `(1, 1 + N, D)` for the encoder (see note (1))."""
    expected = tuple(encoder.position_embedding.shape)
    if array.ndim == 2:
        array = array[None]
    if array.shape == expected:
        return array
    num_patches, dim = encoder.num_patches, encoder.hidden_dim
    if array.ndim == 3 and array.shape[2] == dim and array.shape[1] == num_patches:
        notes.append("pos_embed without a [CLS] slot: zero position for [CLS]")
        return np.concatenate([np.zeros((1, 1, dim), array.dtype), array], axis=1)
    if array.ndim != 3 or array.shape[2] != dim or not interpolate:
        return array  # a shape error, reported with the others (`_shape_error` adds a hint)
    rows = array.shape[1]
    has_cls = _grid_side(rows - 1) is not None
    side = _grid_side(rows - 1 if has_cls else rows)
    height, width = encoder.grid_size
    resampled = resample_position_embedding(array, (height, width))
    if not has_cls:
        resampled = np.concatenate([np.zeros((1, 1, dim), array.dtype), resampled], axis=1)
    notes.append(f"pos_embed resampled bicubically from {side}x{side} to {height}x{width}")
    return resampled


# -- ResNet specifics ------------------------------------------------------------------------------
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


# -- loading ----------------------------------------------------------------------------------------
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


# -- command line ---------------------------------------------------------------------------------
def _parser():
    parser = cli.OneLineParser(prog="convert", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="PyTorch checkpoint (.pth, .pt, .bin) or .safetensors file")
    parser.add_argument("--backbone", required=True,
                        help="preset: vit_tiny | vit_small | vit_base | resnet50 (= resnet50_v1_5)")
    parser.add_argument("--image-size", type=int, default=224, help="default: 224")
    parser.add_argument("--patch-size", type=int, default=None, help="ViT patch size (default 16)")
    parser.add_argument("--output", required=True, help="the encoder .keras file to write")
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="Keras backend (default: current)")
    vit = parser.add_argument_group("ViT overrides of the preset (must match the checkpoint's model)")
    vit.add_argument("--depth", type=int, default=None)
    vit.add_argument("--hidden-dim", type=int, default=None)
    vit.add_argument("--num-heads", type=int, default=None)
    vit.add_argument("--mlp-ratio", type=float, default=None)
    vit.add_argument("--no-qkv-bias", action="store_true", help="the checkpoint's qkv projection has no bias")
    vit.add_argument("--position-embedding", choices=("learned", "sincos"), default=None,
                     help="learned (default; holds the checkpoint's table) or sincos (fixed, frozen)")
    vit.add_argument("--layer-norm-epsilon", type=float, default=None,
                     help="default 1e-6 (timm, MAE, MFM); 1e-5 for models built with PyTorch's default")
    parser.add_argument("--prefix", default=None,
                        help="load only keys under this prefix (default: encoder. or backbone. when present)")
    parser.add_argument("--interpolate-position-embedding", action="store_true",
                        help="resample pos_embed to the encoder's patch grid if it differs")
    return parser


def _error(message):
    return cli.error_line("convert", message)


def main(argv=None):
    """`keras-mfm-convert` / `python -m keras_mfm.convert ...`; returns the exit code (0, or 2 after a
    one-line error)."""
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args, exit_code = cli.parse_and_select_backend("keras_mfm.convert", _parser(), argv,
                                                   replace_process=as_program)
    if args is None:
        return exit_code
    import keras

    if not args.output.endswith(".keras"):
        return _error(f"--output must be a .keras file, got {args.output}.")
    problem = cli.output_problem(args.output)
    if problem:
        return _error(problem)

    names = ("depth", "hidden_dim", "num_heads", "mlp_ratio", "position_embedding", "layer_norm_epsilon")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.no_qkv_bias:
        overrides["qkv_bias"] = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the summary below lists the unused keys
            encoder, report = convert_checkpoint(
                args.checkpoint, args.backbone, args.image_size, args.patch_size, prefix=args.prefix,
                interpolate_position_embedding=args.interpolate_position_embedding, return_report=True,
                **overrides,
            )
    except (ValueError, TypeError) as error:  # ConversionError, bad presets / arguments
        return _error(error)
    except OSError as error:
        return _error(cli.os_error_line(error))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        encoder.save(args.output)
    except OSError as error:
        return _error(cli.os_error_line(error))
    height, width = encoder.image_size
    print(f"converted {args.checkpoint} ({report.summary()}) to {args.output} "
          f"({args.backbone}, {height}x{width}, {keras.backend.backend()} backend)")
    return 0


def console_main():
    """The `keras-mfm-convert` command."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
