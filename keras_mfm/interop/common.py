"""What the PyTorch importers share: the errors, the report of a conversion, and the description
of each weight an encoder needs (`_Target`: its Keras variable, PyTorch key and layout).
"""


import dataclasses


CONTAINER_KEYS = ("state_dict", "model", "module")


ENCODER_PREFIXES = ("encoder.", "backbone.")


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
