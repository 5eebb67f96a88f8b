"""Weight initialisation schemes of the authors' ViTs, and PyTorch's default for a convolution.

| scheme | Linear kernels | patch embedding | [CLS], learned positions, mask token | residual branches |
|---|---|---|---|---|
| `"mfm"` (MFM, BEiT style) | truncated normal std 0.02, cut at +-1 std (std ~0.0108) | the same, bias 0 | the same | block `l` (from 1): `attn.proj`, `fc2` / sqrt(2 l) |
| `"simmim"` (SimMIM) | as `"mfm"` | as `"mfm"` | as `"mfm"` | as `"mfm"` |
| `"mae"` (MAE, AMT, FAMT) | xavier-uniform | xavier-uniform of the kernel viewed as a (D, p*p*3) matrix; bias PyTorch's default | normal std 0.02 | none |

Biases of Linear layers are 0 and LayerNorms 1 / 0 in every scheme. The schemes only set the
initializers of new weights: weights loaded from a file are never re-initialised.
"""

import math

import keras
from keras import ops

INIT_SCHEMES = ("mfm", "simmim", "mae")
TOKEN_STDDEV = 0.02


def check_scheme(scheme):
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"Unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}.")
    return scheme


@keras.saving.register_keras_serializable(package="keras_mfm")
class TruncatedNormal(keras.initializers.Initializer):
    """Normal(0, stddev) truncated to `[-cutoff * stddev, cutoff * stddev]` (PyTorch's
    `trunc_normal_(std=s, a=-s, b=s)` at `cutoff=1`, which BEiT, MFM and SimMIM use), drawn by
    inverting the normal CDF of a uniform draw. The result's standard deviation is
    `stddev * sqrt(1 - 2 c phi(c) / (2 Phi(c) - 1))`: 0.5399 x stddev at `cutoff=1`.
    (Keras' own `TruncatedNormal` cuts at 2 standard deviations.)
    """

    def __init__(self, stddev=TOKEN_STDDEV, cutoff=1.0, seed=None):
        if stddev <= 0 or cutoff <= 0:
            raise ValueError(f"`stddev` and `cutoff` must be positive, got {stddev} and {cutoff}.")
        self.stddev = float(stddev)
        self.cutoff = float(cutoff)
        self.seed = seed

    def __call__(self, shape, dtype=None):
        bound = math.erf(self.cutoff / math.sqrt(2.0))
        uniform = keras.random.uniform(shape, minval=-bound, maxval=bound, dtype="float32", seed=self.seed)
        values = ops.erfinv(uniform) * (math.sqrt(2.0) * self.stddev)
        limit = self.cutoff * self.stddev
        return ops.cast(ops.clip(values, -limit, limit), dtype or "float32")

    def get_config(self):
        return {"stddev": self.stddev, "cutoff": self.cutoff, "seed": self.seed}


def torch_default_kernel():
    """PyTorch's default Linear/Conv weight init, kaiming-uniform with a = sqrt(5):
    U(-1 / sqrt(fan_in), 1 / sqrt(fan_in))."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_in", distribution="uniform")


def torch_default_bias(fan_in):
    """PyTorch's default bias init: U(-1 / sqrt(fan_in), 1 / sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


def linear_kernel(scheme, layer_id=None):
    """Kernel initializer of a transformer Linear layer; `layer_id` (1-based block index) marks a
    residual-branch output (`attn.proj`, `fc2`), which MFM/SimMIM divide by sqrt(2 layer_id)."""
    check_scheme(scheme)
    if scheme == "mae":
        return keras.initializers.GlorotUniform()
    scale = 1.0 if layer_id is None else math.sqrt(2.0 * layer_id)
    return TruncatedNormal(TOKEN_STDDEV / scale)


def patch_embedding(scheme, patch_size, channels, hidden_dim):
    """`(kernel_initializer, bias_initializer)` of the `p x p` patch-embedding convolution."""
    check_scheme(scheme)
    if scheme == "mae":
        # xavier-uniform of the (D, p*p*C) matrix: limit sqrt(6 / (p*p*C + D)); Keras' fan-in of
        # the (p, p, C, D) kernel is p*p*C, so VarianceScaling(fan_in) with this scale gives it.
        fan_in = patch_size * patch_size * channels
        kernel = keras.initializers.VarianceScaling(
            2.0 * fan_in / (fan_in + hidden_dim), mode="fan_in", distribution="uniform"
        )
        return kernel, torch_default_bias(fan_in)
    return TruncatedNormal(TOKEN_STDDEV), keras.initializers.Zeros()


def token(scheme):
    """Initializer of [CLS], the learned position embedding and the mask token."""
    check_scheme(scheme)
    if scheme == "mae":
        return keras.initializers.RandomNormal(stddev=TOKEN_STDDEV)
    return TruncatedNormal(TOKEN_STDDEV)
