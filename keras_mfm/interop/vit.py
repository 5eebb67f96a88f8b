"""ViT checkpoints (timm, MAE, MFM, SimMIM) into `ViTBackbone`: the weights it needs, BEiT-style q/v
biases and layer scale folded in, the position embedding (resampled bicubically on request).
"""


import re

import numpy as np

from keras_mfm.interop.common import ConversionError, _CONV, _LINEAR, _Target


#: top-level ViT parameters of architectures ViTBackbone does not have
UNSUPPORTED_VIT = {
    "norm_pre": "a LayerNorm before the blocks (CLIP-style)",
    "reg_token": "register tokens",
    "dist_token": "a distillation token (DeiT)",
    "rel_pos_bias": "a shared relative position bias (BEiT)",
    "patch_embed.norm": "a LayerNorm after the patch embedding",
}


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
