#!/usr/bin/env python
"""Training throughput of keras_mfm on each Keras backend against a plain-PyTorch reference.

    python benchmarks/throughput.py                       # every configuration, every backend (~8 min here)
    python benchmarks/throughput.py --quick               # smoke run: depth 2, batch 16, one timed step
    python benchmarks/throughput.py --configs mfm_vit --backends torch,jax --batch-size 64 --repeats 5
    python benchmarks/throughput.py --configs mfm_vit --backends tensorflow,tensorflow-nojit,jax,jax-nojit
    python benchmarks/throughput.py --profile torch --configs mfm_vit      # torch profiler of one Keras step

Configurations (`--configs`):

    mfm_vit       MFM, ViT-Tiny/4 (192-d, 12 blocks, 3 heads) at 32x32, frequency loss on the masked frequencies
    mfm_resnet50  MFM, ResNet-50 (keras.applications) at 64x64, p_low 0.3, head 1x1 conv + pixel shuffle by 32
    mae           MAE, ViT-Tiny/4 at 32x32 (sin-cos positions), mask 0.75, a light decoder: 192-d x 4 blocks
                  x 3 heads (`--decoder-dim/--decoder-depth/--decoder-heads`)
    famt          FAMT, same model, importance phase (a filled table; maps followed through crop/flip), mask 0.45,
                  throw 0.40
    mae_d512      MAE with the library's default decoder, the authors': 512-d x 8 blocks x 16 heads
    famt_d512     FAMT with that decoder

What is timed: one training step = forward, loss, backward, AdamW update (the library's recipe: AdamW 0.9/0.95,
weight decay 0.05 except biases/norms/position embedding/[CLS]/mask token, global gradient clipping at 3.0).
Keras: `model.train_on_batch` on one fixed in-memory batch (minus the symbolic model check it repeats on every
call and `fit` runs once): the compiled train step `model.fit` runs in
`train.py` (minus the augmentation, timed on its own), synchronised by its returned loss; `--fit` times
`model.fit` on a `tf.data` repeat of the batch instead. `jit_compile="auto"` (XLA on JAX; on TensorFlow only
with a GPU/TPU, so a TF graph on this CPU; eager on PyTorch; `-nojit` variants turn XLA off), after
warm-up steps (compilation excluded); one repeat = `--steps` steps, the median over `--repeats`
repeats is reported. Every implementation runs in its own subprocess (`KERAS_BACKEND` set before
Keras is imported); the repeats are interleaved (Keras backends and the reference take turns), so
that a machine shared with other jobs slows them alike.

The reference (`--references`) is the same network and step in eager PyTorch, written the way the authors'
code is: timm-style ViT blocks (fused qkv Linear; explicit `softmax(q k^T) v` attention as in the timm version
MAE/MFM pinned, or `F.scaled_dot_product_attention` as timm does today: `sdpa`), NCHW tensors, a
torchvision-style bottleneck ResNet-50 with keras.applications' layout (stride in the first 1x1 convolution
of a stage, biased convolutions, BatchNorm eps 1.001e-5), `torch.fft` for the corruption and the loss, the
same token counts, `torch.optim.AdamW` + `clip_grad_norm_`.

FLOPs: forward matmul and convolution FLOPs (2 x multiply-adds) counted analytically from the shapes (FFTs,
normalisations, softmax and elementwise work not counted), x 3 for forward + backward; shown as a share of
the machine's dense float32 matmul peak, measured in the same run (`torch.matmul` and `np.matmul` of
2048 x 2048 matrices, the better of the two).

The input pipeline (`keras_mfm.data.pretraining_epoch` on the real CIFAR-10 JPEGs: decode + RandomResizedCrop
+ flip, with and without FAMT's geometry) is timed alone, in images/s, for comparison with the training step.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {
    "mfm_vit": dict(method="mfm", backbone="vit_tiny", image_size=32, patch_size=4),
    "mfm_resnet50": dict(method="mfm", backbone="resnet50", image_size=64, patch_size=None),
    "mae": dict(method="mae", backbone="vit_tiny", image_size=32, patch_size=4),
    "famt": dict(method="famt", backbone="vit_tiny", image_size=32, patch_size=4),
    # the library's default decoder, the authors' (512-d, 8 blocks, 16 heads)
    "mae_d512": dict(method="mae", backbone="vit_tiny", image_size=32, patch_size=4, decoder=(512, 8, 16)),
    "famt_d512": dict(method="famt", backbone="vit_tiny", image_size=32, patch_size=4, decoder=(512, 8, 16)),
}
#: (MAE, FAMT) configuration pairs whose step-time ratio is printed
FAMT_PAIRS = (("mae", "famt"), ("mae_d512", "famt_d512"))


def decoder_shape(spec, args):
    """(width, depth, heads) of the MAE/FAMT decoder of a configuration."""
    return spec.get("decoder") or (args.decoder_dim, args.decoder_depth, args.decoder_heads)
VIT_TINY = dict(hidden_dim=192, depth=12, num_heads=3)
KERAS_BACKENDS = ("torch", "jax", "tensorflow")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: `--backends jax+xnnpack`: that XLA CPU option for the implementation (XLA's own debug options, in
#: xla.proto; kernels only, no fast-math: float32 results). Not set by default.
XLA_VARIANTS = {
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
}
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="mfm_vit,mfm_resnet50,mae,famt,mae_d512,famt_d512",
                        help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--backends", default="torch,jax,tensorflow",
                        help="comma-separated Keras backends; a '-nojit' suffix (tensorflow-nojit, jax-nojit) turns "
                             "XLA off, 'torch-compile' uses jit_compile=True (torch.compile); '@N' (torch@1) sets N "
                             "torch intra-op threads for that implementation (also for references: explicit@1); "
                             "'+xnnpack' or '+onednn' (jax+xnnpack) adds that XLA CPU option (XLA_FLAGS) for the "
                             "implementation")
    parser.add_argument("--references", default="explicit",
                        help="comma-separated PyTorch references: 'explicit' (authors' attention), 'sdpa' "
                             "(F.scaled_dot_product_attention); 'none' for no reference")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=None, help="ViT encoder depth (default: vit_tiny's 12)")
    parser.add_argument("--decoder-dim", type=int, default=192)
    parser.add_argument("--decoder-depth", type=int, default=4)
    parser.add_argument("--decoder-heads", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of the warm-up fit (compilation)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per implementation (median)")
    parser.add_argument("--pipeline-steps", type=int, default=20, help="batches of the input-pipeline timing (0: skip)")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--fit", action="store_true",
                        help="time `model.fit` on a tf.data repeat of the batch instead of `train_on_batch` (the same "
                             "compiled train step; on this machine fit calls took 1.28 s x 2^k more often than not: "
                             "a wait at their end, cause not found)")
    parser.add_argument("--quick", action="store_true", help="smoke run: depth 2, batch 16, 1 step x 2 repeats")
    parser.add_argument("--profile", default=None, choices=KERAS_BACKENDS + ("reference",),
                        help="instead of the table: profile the step of the first config on this backend")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.depth = args.depth or 2
        args.batch_size = 16
        args.steps, args.repeats, args.warmup_steps = 1, 2, 1
        args.pipeline_steps = min(args.pipeline_steps, 4)
    return args


# -- FLOPs ----------------------------------------------------------------------------------------------
def token_counts(num_patches, mask_ratio, throw_ratio):
    """The authors' counts: MAE keeps int(N (1 - r)); AMT/FAMT mask int(N m), throw
    int(N (m + t)) - int(N m) (as `keras_mfm.masking.token_counts`)."""
    if not throw_ratio:
        keep = int(num_patches * (1 - mask_ratio))
        return num_patches - keep, 0, keep
    masked = int(num_patches * mask_ratio)
    thrown = int(num_patches * (mask_ratio + throw_ratio)) - masked
    return masked, thrown, num_patches - masked - thrown


def method_ratios(method):
    return {"mae": (0.75, 0.0), "famt": (0.45, 0.40)}.get(method)


def vit_blocks_flops(tokens, dim, depth, mlp_ratio=4.0):
    """Forward FLOPs of `depth` pre-norm blocks on `tokens` tokens of width `dim` (matmuls only)."""
    hidden = int(dim * mlp_ratio)
    per_block = 2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim + 2 * 2 * tokens * dim * hidden
    per_block += 2 * 2 * tokens * tokens * dim  # q k^T and A v
    return depth * per_block


def resnet50_flops(image_size):
    """Forward FLOPs of keras.applications' ResNet-50 (convolutions only) at `image_size`."""
    flops, size, channels = 0, image_size, 3
    size = (size + 6 - 7) // 2 + 1  # 7x7/2 on a 3-padded input
    flops += 2 * size * size * 7 * 7 * channels * 64
    channels = 64
    size = (size + 2 - 3) // 2 + 1  # 3x3/2 max-pool on a 1-padded input
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for block in range(blocks):
            s = stride if block == 0 else 1
            out = (size - 1) // s + 1
            flops += 2 * out * out * channels * width  # 1x1 (strided)
            flops += 2 * out * out * width * width * 9  # 3x3
            flops += 2 * out * out * width * 4 * width  # 1x1 expand
            if block == 0:
                flops += 2 * out * out * channels * 4 * width  # projection shortcut
            channels, size = 4 * width, out
    return flops


def step_flops(name, args):
    """Forward + backward FLOPs of one training step (3 x the forward matmul/conv FLOPs) for the batch."""
    spec = CONFIGS[name]
    size, batch = spec["image_size"], args.batch_size
    if spec["backbone"] == "resnet50":
        grid = size // 32
        forward = resnet50_flops(size) + 2 * grid * grid * 2048 * 32 * 32 * 3
        return 3 * batch * forward
    dim, depth = VIT_TINY["hidden_dim"], args.depth or VIT_TINY["depth"]
    p = spec["patch_size"]
    n = (size // p) ** 2
    embed = 2 * n * p * p * 3 * dim
    if spec["method"] == "mfm":
        forward = embed + vit_blocks_flops(1 + n, dim, depth) + 2 * n * dim * p * p * 3
    else:
        masked, _, visible = token_counts(n, *method_ratios(spec["method"]))
        dd, decoder_depth, _ = decoder_shape(spec, args)
        forward = (embed + vit_blocks_flops(1 + visible, dim, depth) + 2 * (1 + visible) * dim * dd
                   + vit_blocks_flops(1 + visible + masked, dd, decoder_depth) + 2 * masked * dd * p * p * 3)
    return 3 * batch * forward


def matmul_peak(n=2048, repeats=5):
    """Dense float32 matmul FLOP/s: the best of `torch.matmul` and `np.matmul` on n x n matrices."""
    import numpy as np
    import torch

    results = {}
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    results["torch.matmul"] = 2 * n**3 / best
    x, y = a.numpy(), b.numpy()
    np.matmul(x, y)
    best = min(_timed(lambda: np.matmul(x, y)) for _ in range(repeats))
    results["np.matmul"] = 2 * n**3 / best
    return results


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- the Keras side -----------------------------------------------------------------------------------
def keras_model(name, args):
    """The library's model of configuration `name`, compiled with the recipe's AdamW, and one input batch."""
    import keras
    import numpy as np

    from keras_mfm import backbones, methods
    from keras_mfm.optimizers import recipes as optimization
    from keras_mfm.models.token_masking import whole_image_inputs

    spec = CONFIGS[name]
    keras.utils.set_random_seed(0)
    options = {}
    if spec["backbone"] != "resnet50":
        options = dict(patch_size=spec["patch_size"], depth=args.depth or VIT_TINY["depth"])
        if spec["method"] != "mfm":
            options["position_embedding"] = "sincos"
    encoder = backbones.get_backbone(spec["backbone"], spec["image_size"], **options)
    batch = args.batch_size
    rng = np.random.default_rng(0)
    images = rng.random((batch, spec["image_size"], spec["image_size"], 3)).astype("float32")
    inputs = images
    if spec["method"] == "mfm":
        model = methods.build_method("mfm", encoder, seed=0)
    else:
        extra = {"num_images": batch} if spec["method"] == "famt" else {}
        decoder_dim, decoder_depth, decoder_heads = decoder_shape(spec, args)
        model = methods.build_method(spec["method"], encoder, seed=0, decoder_dim=decoder_dim,
                                     decoder_depth=decoder_depth, decoder_heads=decoder_heads, **extra)
    model.build()
    if spec["method"] == "famt":
        model.set_importance(rng.random((batch, encoder.num_patches)).astype("float32") + 0.01)
        inputs = whole_image_inputs(images)
    optimizer = optimization.build_optimizer(model, optimization.Recipe(), batch, total_steps=10_000)
    variant = args.worker.split("@")[0].split("+")[0]
    jit = {"torch-compile": True}.get(variant, False if variant.endswith("-nojit") else "auto")
    model.compile(optimizer=optimizer, jit_compile=jit)
    return model, inputs


def keras_runner(name, args):
    import tensorflow as tf

    model, inputs = keras_model(name, args)

    def run(steps):
        start = time.perf_counter()
        if args.fit:
            model.fit(tf.data.Dataset.from_tensors(inputs).repeat(steps), verbose=0)
        else:
            for _ in range(steps):
                model.train_on_batch(inputs)  # returns the loss as a Python float: the step has finished
            # `train_on_batch` checks the model symbolically on every call (`_symbolic_build`,
            # 5-10 ms on eager PyTorch), which `fit` does once per call of `fit`; after the warm-up
            # it is skipped, so that a timed step costs what it costs inside `fit`.
            model._symbolic_build = _skip_symbolic_build
        return time.perf_counter() - start

    def _skip_symbolic_build(*args, **kwargs):
        pass

    return run, model


# -- the PyTorch reference --------------------------------------------------------------------------
def reference_runner(name, args, attention="explicit"):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    spec = CONFIGS[name]

    class Attention(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.heads, self.scale = heads, (dim // heads) ** -0.5
            self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

        def forward(self, x):
            b, t, c = x.shape
            qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            if attention == "sdpa":
                x = F.scaled_dot_product_attention(q, k, v)
            else:
                attn = (q @ k.transpose(-2, -1)) * self.scale
                x = attn.softmax(dim=-1) @ v
            return self.proj(x.transpose(1, 2).reshape(b, t, c))

    class Block(nn.Module):
        def __init__(self, dim, heads, mlp_ratio=4.0):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
            hidden = int(dim * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ViT(nn.Module):
        def __init__(self, size, patch, dim, depth, heads):
            super().__init__()
            self.num_patches = (size // patch) ** 2
            self.patch_embed = nn.Conv2d(3, dim, patch, patch)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.num_patches, dim) * 0.02)
            self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
            self.norm = nn.LayerNorm(dim, eps=1e-6)

        def forward(self, x, keep=None):
            x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
            if keep is not None:
                x = torch.gather(x, 1, keep[:, :, None].expand(-1, -1, x.shape[-1]))
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
            for block in self.blocks:
                x = block(x)
            return self.norm(x)

    class Bottleneck(nn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, stride), nn.BatchNorm2d(width, eps=1.001e-5)
            self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width, eps=1.001e-5)
            self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1), nn.BatchNorm2d(4 * width, eps=1.001e-5)
            self.downsample = None
            if stride != 1 or cin != 4 * width:
                self.downsample = nn.Sequential(nn.Conv2d(cin, 4 * width, 1, stride),
                                                nn.BatchNorm2d(4 * width, eps=1.001e-5))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = F.relu(self.bn1(self.conv1(x)))
            out = F.relu(self.bn2(self.conv2(out)))
            return F.relu(self.bn3(self.conv3(out)) + identity)

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3), nn.BatchNorm2d(64, eps=1.001e-5)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            layers, cin = [], 64
            for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                for block in range(blocks):
                    layers.append(Bottleneck(cin, width, stride if block == 0 else 1))
                    cin = 4 * width
            self.layers = nn.Sequential(*layers)

        def forward(self, x):
            return self.layers(self.maxpool(F.relu(self.bn1(self.conv1(x)))))

    size, batch = spec["image_size"], args.batch_size
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = torch.rand(batch, 3, size, size)
    dim, heads, depth = VIT_TINY["hidden_dim"], VIT_TINY["num_heads"], args.depth or VIT_TINY["depth"]

    if spec["method"] == "mfm":
        if spec["backbone"] == "resnet50":
            encoder, stride, features, p_low = ResNet50(), 32, 2048, 0.3
        else:
            encoder = ViT(size, spec["patch_size"], dim, depth, heads)
            stride, features, p_low = spec["patch_size"], dim, 0.5
        head = nn.Sequential(nn.Conv2d(features, stride**2 * 3, 1), nn.PixelShuffle(stride))
        model = nn.ModuleDict({"encoder": encoder, "head": head})
        radius = 16 / 224 * size
        yy, xx = np.meshgrid(np.arange(size) - size // 2, np.arange(size) - size // 2, indexing="ij")
        low = torch.from_numpy((np.sqrt(yy**2 + xx**2) < radius).astype("float32"))

        def loss_fn():
            # the corruption (authors' code: fftshift(fft2), mask, ifftshift, ifft2, real, clamp)
            is_low = (torch.rand(batch) < p_low).float()[:, None, None, None]
            mask = is_low * low + (1 - is_low) * (1 - low)  # (B, 1, H, W), 1 = kept
            spectrum = torch.fft.fftshift(torch.fft.fft2(images), dim=(-2, -1)) * mask
            corrupted = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real.clamp(0, 1)
            x = (corrupted - mean) / std
            target = (images - mean) / std
            tokens = encoder(x)
            if spec["backbone"] != "resnet50":
                grid = size // stride
                tokens = tokens[:, 1:].transpose(1, 2).reshape(batch, dim, grid, grid)
            pred = head(tokens)
            # frequency loss (authors' FrequencyLoss: ortho fft2 of both, distance, masked average)
            pf = torch.fft.fftshift(torch.fft.fft2(pred, norm="ortho"), dim=(-2, -1))
            tf_ = torch.fft.fftshift(torch.fft.fft2(target, norm="ortho"), dim=(-2, -1))
            pf, tf_ = torch.stack([pf.real, pf.imag], -1), torch.stack([tf_.real, tf_.imag], -1)
            distance = torch.sqrt(((pf - tf_) ** 2).sum(-1) + 1e-12)
            weight = 1 - mask
            return (distance * weight).sum() / (weight.sum() * 3 + 1e-12)
    else:
        p = spec["patch_size"]
        grid = size // p
        n = grid * grid
        masked_count, thrown_count, visible_count = token_counts(n, *method_ratios(spec["method"]))
        encoder = ViT(size, p, dim, depth, heads)
        dd, decoder_depth, decoder_heads = decoder_shape(spec, args)
        decoder = nn.ModuleDict({
            "embed": nn.Linear(dim, dd), "blocks": nn.ModuleList([Block(dd, decoder_heads)
                                                                 for _ in range(decoder_depth)]),
            "norm": nn.LayerNorm(dd, eps=1e-6), "pred": nn.Linear(dd, p * p * 3),
        })
        decoder.mask_token = nn.Parameter(torch.randn(1, 1, dd) * 0.02)
        decoder_pos = torch.randn(1, 1 + n, dd) * 0.02  # fixed (sin-cos in the library): not trained
        encoder.pos_embed.requires_grad_(False)
        model = nn.ModuleDict({"encoder": encoder, "decoder": decoder})
        table = torch.rand(batch, n) + 0.01  # FAMT's importance table (one row per training image)
        index, flip = torch.arange(batch), torch.zeros(batch, dtype=torch.bool)
        theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(batch, 2, 3)  # identity crop box

        def gather(x, idx):
            return torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[-1]))

        def loss_fn():
            if spec["method"] == "famt":
                maps = table[index].view(batch, 1, grid, grid)  # follow the crop box and the flip
                coords = F.affine_grid(theta, (batch, 1, grid, grid), align_corners=False)
                maps = F.grid_sample(maps, coords, mode="bilinear", padding_mode="border", align_corners=False)
                maps = torch.where(flip[:, None, None, None], maps.flip(-1), maps).view(batch, n)
                keys = maps.log() - torch.log(-torch.log(torch.rand(batch, n).clamp(1e-38, 1 - 2**-24)))
            else:
                keys = torch.rand(batch, n)  # MAE's random masking: argsort of uniform noise
            order = torch.argsort(keys, dim=1, descending=True)
            masked = order[:, :masked_count].sort(dim=1).values
            visible = order[:, masked_count + thrown_count:].sort(dim=1).values
            x = (images - mean) / std
            encoded = encoder(x, keep=visible)
            z = decoder["embed"](encoded)
            pos = decoder_pos.expand(batch, -1, -1)
            z = torch.cat([z[:, :1] + pos[:, :1], z[:, 1:] + gather(pos[:, 1:], visible),
                           decoder.mask_token + gather(pos[:, 1:], masked)], dim=1)
            for block in decoder["blocks"]:
                z = block(z)
            pred = decoder["pred"](decoder["norm"](z)[:, 1 + visible_count:])
            target = x.reshape(batch, 3, grid, p, grid, p).permute(0, 2, 4, 3, 5, 1).reshape(batch, n, p * p * 3)
            return ((pred - gather(target, masked)) ** 2).mean()

    decay, no_decay = [], []
    for pname, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or "token" in pname or "pos_embed" in pname else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-4, betas=(0.9, 0.95))
    params = decay + no_decay
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        return loss

    def run(steps):
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        float(loss.detach())
        return time.perf_counter() - start

    return run, step


# -- the input pipeline -------------------------------------------------------------------------------
def pipeline_rates(args):
    """images/s of `data.pretraining_epoch` on real CIFAR-10 JPEGs (decode + crop + flip [+ geometry])."""
    from keras_mfm import data

    rows = []
    images = args.pipeline_steps * args.batch_size
    split = data.load_split(data.resolve_data(args.data), "train", limit=images, seed=0)
    sizes = sorted({CONFIGS[c]["image_size"] for c in args.config_list})
    for size in sizes:
        for geometry in ((False, True) if size == 32 else (False,)):
            # decode every epoch (no cache): the JPEGs are read and decoded, then cropped and flipped
            start = time.perf_counter()
            for _ in data.pretraining_epoch(split, size, args.batch_size, args.pipeline_steps, 0,
                                            with_geometry=geometry, cached=split.dataset):
                pass
            decode = images / (time.perf_counter() - start)
            # decoded images cached in memory (every epoch after the first): crop and flip only
            cached = split.dataset.cache()
            for _ in data.pretraining_epoch(split, size, args.batch_size, args.pipeline_steps, 0, cached=cached):
                pass
            start = time.perf_counter()
            for _ in data.pretraining_epoch(split, size, args.batch_size, args.pipeline_steps, 1,
                                            with_geometry=geometry, cached=cached):
                pass
            augment = images / (time.perf_counter() - start)
            rows.append({"size": size, "geometry": geometry, "decode": decode, "cached": augment})
    return rows


# -- worker processes ---------------------------------------------------------------------------------
def worker_main(args):
    """One implementation in this process: build, warm up, then answer `time STEPS` lines on stdin."""
    import warnings

    warnings.filterwarnings("ignore")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker == "pipeline":
        print(json.dumps(pipeline_rates(args)), flush=True)
        return
    if args.worker.startswith("reference"):
        run, _ = reference_runner(args.config, args, attention=args.worker.split("@")[0].split("-", 1)[1])
    else:
        run, _ = keras_runner(args.config, args)
    start = time.perf_counter()
    run(args.warmup_steps)
    print(json.dumps({"ready": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        print(json.dumps({"seconds": run(int(command[1]))}), flush=True)


class Worker:
    def __init__(self, impl, config, args):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
        threads = args.threads
        if "@" in impl:  # "torch@1", "reference-explicit@1": that many torch threads
            threads = int(impl.split("@")[1])
        if "+" in impl:  # "jax+xnnpack": an XLA CPU option
            flag = XLA_VARIANTS[impl.split("+")[1].split("@")[0]]
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
        if not impl.startswith("reference") and impl != "pipeline":
            env["KERAS_BACKEND"] = impl.split("-")[0].split("@")[0].split("+")[0]
        else:
            env.setdefault("KERAS_BACKEND", "torch")
        command = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--config", config or "",
                   "--batch-size", str(args.batch_size), "--warmup-steps", str(args.warmup_steps),
                   "--decoder-dim", str(args.decoder_dim), "--decoder-depth", str(args.decoder_depth),
                   "--decoder-heads", str(args.decoder_heads), "--data", args.data,
                   "--pipeline-steps", str(args.pipeline_steps), "--configs", args.configs]
        if args.fit:
            command.append("--fit")
        if args.depth:
            command += ["--depth", str(args.depth)]
        if threads:
            command += ["--threads", str(threads)]
        self.impl = impl
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)

    def read(self):
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise RuntimeError(f"worker {self.impl} died (exit code {self.process.returncode})")
        return json.loads(line)

    def time(self, steps):
        self.process.stdin.write(f"time {steps}\n")
        self.process.stdin.flush()
        return self.read()["seconds"]

    def close(self):
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
            except BrokenPipeError:
                pass
            self.process.wait(timeout=120)


def measure_config(config, impls, args):
    """Median seconds per step of each implementation, repeats interleaved across implementations."""
    workers, warmup = [], {}
    try:
        for impl in impls:  # one at a time, so that compilations do not compete
            worker = Worker(impl, config, args)
            warmup[impl] = worker.read()["ready"]
            workers.append(worker)
        samples = {w.impl: [] for w in workers}
        for repeat in range(args.repeats):
            turn = workers[repeat % len(workers):] + workers[:repeat % len(workers)]
            for worker in turn:
                samples[worker.impl].append(worker.time(args.steps) / args.steps)
    finally:
        for worker in workers:
            worker.close()
    return {impl: statistics.median(values) for impl, values in samples.items()}, samples, warmup


def profile(args):
    """Torch profiler (PyTorch backend or the reference) or plain timings of one step, top operators."""
    config = args.config_list[0]
    if args.profile == "reference":
        os.environ.setdefault("KERAS_BACKEND", "torch")
        run, step = reference_runner(config, args)
        run(args.warmup_steps)
    else:
        os.environ["KERAS_BACKEND"] = args.profile
        args.worker = args.profile
        run, model = keras_runner(config, args)
        run(args.warmup_steps)
    if args.profile in ("torch", "reference"):
        import torch

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run(args.steps)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    else:
        print(f"{args.profile}: {run(args.steps) / args.steps:.3f} s per step")


def fmt_rate(value):
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def main():
    args = parse_args()
    args.config_list = [c for c in args.configs.split(",") if c]
    for config in args.config_list:
        if config not in CONFIGS:
            raise SystemExit(f"throughput.py: error: unknown config {config!r}; choose from {', '.join(CONFIGS)}")
    if args.worker:
        args.config_list = [c for c in args.configs.split(",") if c]
        worker_main(args)
        return
    if args.profile:
        profile(args)
        return
    backends = [b for b in args.backends.split(",") if b]
    references = [] if args.references == "none" else [f"reference-{r}" for r in args.references.split(",") if r]
    impls = backends + references
    began = time.perf_counter()
    import torch

    peaks = matmul_peak()
    peak = max(peaks.values())
    depth = args.depth or VIT_TINY["depth"]
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"batch {args.batch_size}; ViT-Tiny/4 depth {depth}; decoder {args.decoder_dim}-d x {args.decoder_depth} "
          f"x {args.decoder_heads} heads; {args.repeats} interleaved repeats x {args.steps} steps after "
          f"{args.warmup_steps} warm-up steps; median; load average {os.getloadavg()[0]:.1f}")
    print("dense float32 matmul peak (2048^3): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
          + f" -> peak {peak / 1e9:.1f} GFLOP/s\n")
    if args.pipeline_steps:
        worker = Worker("pipeline", None, args)
        pipeline = worker.read()
        worker.close()
        print(f"Input pipeline alone (data.pretraining_epoch, real CIFAR-10 JPEGs, {args.pipeline_steps} batches of "
              f"{args.batch_size}, tf.data on {os.cpu_count()} cores):\n")
        print("| image size | FAMT geometry | decode + crop + flip (images/s) | crop + flip from the decoded cache "
              "(images/s) |")
        print("|---|---|---|---|")
        for row in pipeline:
            print(f"| {row['size']} | {'yes' if row['geometry'] else 'no'} | {fmt_rate(row['decode'])} | "
                  f"{fmt_rate(row['cached'])} |")
        print(flush=True)
    rows, ratios = [], {}
    print("| configuration | implementation | s / step | images/s | vs PyTorch reference | GFLOP / step | "
          "GFLOP/s | % of matmul peak | warm-up (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config in args.config_list:
        medians, samples, warmup = measure_config(config, impls, args)
        flops = step_flops(config, args)
        ref = medians.get(references[0]) if references else None
        for impl in impls:
            seconds = medians[impl]
            ratio = f"{ref / seconds:.2f}x" if ref else ""
            ratios[(config, impl)] = seconds
            print(f"| {config} | {impl} | {seconds:.3f} | {fmt_rate(args.batch_size / seconds)} | {ratio} | "
                  f"{flops / 1e9:.1f} | {flops / seconds / 1e9:.1f} | {100 * flops / seconds / peak:.0f} % | "
                  f"{warmup[impl]:.0f} |", flush=True)
        rows.append((config, samples))
    for mae, famt in FAMT_PAIRS:
        if mae in args.config_list and famt in args.config_list:
            print(f"\nFAMT step time / MAE step time ({famt} / {mae}): " + ", ".join(
                f"{impl} {ratios[(famt, impl)] / ratios[(mae, impl)]:.2f}" for impl in impls))
    print("\nall samples (s / step): " + "; ".join(
        f"{config} {impl} " + "/".join(f"{s:.3f}" for s in values)
        for config, samples in rows for impl, values in samples.items()))
    peaks_after = matmul_peak()
    print("matmul peak at the end: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks_after.items())
          + f"; load average {os.getloadavg()[0]:.1f}; total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
