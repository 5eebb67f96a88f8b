"""Reading a PyTorch checkpoint without running code from it: `torch.load(..., weights_only=True)`
with inert stand-ins for the plain Python objects training checkpoints pickle, `.safetensors`
files, and finding the encoder's state dict (and its architecture) inside the file.
"""


from collections import OrderedDict
from collections.abc import Mapping
import os
import pickle
import re

import numpy as np

from keras_mfm.interop.common import CONTAINER_KEYS, ConversionError, ENCODER_PREFIXES


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
