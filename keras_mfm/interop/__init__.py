"""Import PyTorch checkpoints (timm / MAE / MFM / SimMIM ViTs, torchvision / timm / MFM ResNet-50)
into keras_mfm encoders.

    python -m keras_mfm.convert mae_pretrain_vit_base.pth --backbone vit_base --image-size 224 \
        --patch-size 16 --output encoder.keras
    python -m keras_mfm.convert mfm_resnet50.pth --backbone resnet50_v1_5 --image-size 224 --output encoder.keras

    from keras_mfm.interop import convert_checkpoint, load_torch_state_dict
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

from keras_mfm.interop.common import ConversionError, ConversionReport
from keras_mfm.interop.loading import convert_checkpoint, load_torch_state_dict
from keras_mfm.interop.reading import checkpoint_architecture, find_state_dict, read_checkpoint, read_safetensors
from keras_mfm.interop.vit import resample_position_embedding

__all__ = ["ConversionError", "ConversionReport", "checkpoint_architecture", "convert_checkpoint", "find_state_dict",
           "load_torch_state_dict", "read_checkpoint", "read_safetensors", "resample_position_embedding"]
