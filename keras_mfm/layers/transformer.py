"""Pre-norm transformer block with fused-qkv attention (ViT, MAE decoder)."""

import keras
from keras import ops

from keras_mfm import backend
from keras_mfm.layers import initializers
from keras_mfm.layers.fused import Dense, LayerNormalization


def call_sublayer(parent, layer, *args, **kwargs):
    """`layer(*args, **kwargs)` for a sublayer, called from inside `parent.call`.

    When the sublayer is built and has its parent's dtype policy, and that policy computes in its
    variables' dtype (no autocasting: float32, float64), this runs `layer.call` directly: inside
    its parent's call the inputs are already tensors of that dtype, and the rest of a Keras layer
    call (input checks, name scope, call context, argument binding) costs ~0.17 ms of Python per
    call on the eager PyTorch backend, against ~0.06 ms for a `Dense.call`; a transformer block
    makes seven such calls. Otherwise (unbuilt, another policy, mixed precision, quantised) it is
    `layer(...)`.
    """
    policy = layer.dtype_policy
    if (
        layer.built
        and policy.name == parent.dtype_policy.name
        and policy.compute_dtype == policy.variable_dtype
    ):
        return layer.call(*args, **kwargs)
    return layer(*args, **kwargs)


def _fused_attention_pays(x):
    """False on the PyTorch backend with `x` on a CPU, where the explicit attention is faster."""
    if not backend.ON_TORCH:
        return True
    return getattr(getattr(x, "device", None), "type", "cpu") != "cpu"


@keras.saving.register_keras_serializable(package="keras_mfm")
class MultiHeadSelfAttention(keras.layers.Layer):
    """Self-attention with one fused qkv projection.

    `(B, T, D) -> (B, T, D)`. The default path calls `keras.ops.dot_product_attention`
    (the backend's fused kernel); with `return_attention=True` it computes
    `A = softmax(q k^T / sqrt(d_head))` explicitly in float32 and also returns `A`, shape
    `(B, heads, T, T)`. Both paths give the same output. The PyTorch backend on a CPU always
    takes the explicit path: there, two batched matmuls and a softmax are faster than PyTorch's
    CPU flash-attention kernel for the short sequences of these models (forward + backward of
    (64, 3 heads, 65 tokens, 64): 10.1 ms against 15.7 ms on two cores; `benchmarks/throughput.py`).
    """

    def __init__(self, hidden_dim, num_heads, qkv_bias=True, init="mae", layer_id=None, **kwargs):
        super().__init__(**kwargs)
        if hidden_dim % num_heads:
            raise ValueError(
                f"`hidden_dim` ({hidden_dim}) must be divisible by `num_heads` ({num_heads})."
            )
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.qkv_bias = qkv_bias
        self.head_dim = hidden_dim // num_heads
        self.init = initializers.check_scheme(init)
        self.layer_id = layer_id
        self.qkv = Dense(
            3 * hidden_dim, use_bias=qkv_bias, kernel_initializer=initializers.linear_kernel(init),
            dtype=self.dtype_policy, name="qkv",
        )
        self.proj = Dense(
            hidden_dim, kernel_initializer=initializers.linear_kernel(init, layer_id), dtype=self.dtype_policy,
            name="proj",
        )

    def build(self, input_shape):
        self.qkv.build(input_shape)
        self.proj.build(tuple(input_shape[:-1]) + (self.hidden_dim,))
        self.built = True

    def call(self, x, return_attention=False):
        if backend.ON_TORCH and (return_attention or not _fused_attention_pays(x)):
            # the explicit path below, as PyTorch calls (`fused_torch.self_attention`)
            from keras_mfm.backend.torch import layers as fused_torch

            out, attention = fused_torch.self_attention(
                call_sublayer(self, self.qkv, x), self.num_heads, return_attention
            )
            out = call_sublayer(self, self.proj, ops.cast(out, self.compute_dtype))
            return (out, attention) if return_attention else out
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        qkv = ops.reshape(call_sublayer(self, self.qkv, x), (batch, length, 3, self.num_heads, self.head_dim))
        # One transpose to (3, B, heads, T, d_head), then `unstack`: q, k and v come out
        # contiguous in the (B, heads, T, d_head) layout attention kernels work in, and the
        # backward pass is one stack (indexing `qkv[:, :, i]` costs a zero-filled copy of the
        # whole qkv tensor per slice in PyTorch's autograd).
        q, k, v = ops.unstack(ops.transpose(qkv, (2, 0, 3, 1, 4)), 3, axis=0)
        if return_attention or not _fused_attention_pays(x):
            scale = self.head_dim**-0.5
            scores = ops.einsum(
                "bhqd,bhkd->bhqk", ops.cast(q, "float32") * scale, ops.cast(k, "float32")
            )
            attention = ops.softmax(scores, axis=-1)
            out = ops.einsum("bhqk,bhkd->bqhd", attention, ops.cast(v, "float32"))
            out = ops.cast(out, self.compute_dtype)
        else:
            # `dot_product_attention` takes (B, T, heads, d_head): transposed views, which the
            # backend transposes back without a copy.
            q, k, v = (ops.transpose(t, (0, 2, 1, 3)) for t in (q, k, v))
            out = ops.dot_product_attention(q, k, v)
        out = call_sublayer(self, self.proj, ops.reshape(out, (batch, length, self.hidden_dim)))
        if return_attention:
            return out, attention
        return out

    def get_config(self):
        config = super().get_config()
        config.update({
            "hidden_dim": self.hidden_dim, "num_heads": self.num_heads, "qkv_bias": self.qkv_bias,
            "init": self.init, "layer_id": self.layer_id,
        })
        return config


@keras.saving.register_keras_serializable(package="keras_mfm")
class TransformerBlock(keras.layers.Layer):
    """Pre-norm block: `x + DropPath(g1 * Attn(LN(x)))`, then `x + DropPath(g2 * MLP(LN(x)))`.

    `(B, T, D) -> (B, T, D)`; MLP is Dense(mlp_ratio * D) -> GELU (exact) -> Dense(D).
    Drop path (stochastic depth) drops the residual branch per sample (a `Dropout` whose noise is
    shared over tokens and channels). `g1`, `g2` are per-channel layer scales `(D,)` initialised
    to `layer_scale` (CaiT/BEiT; SimMIM's 0.1), absent (1) when `layer_scale` is None.
    `init` is the weight-init scheme (`keras_mfm.layers.initializers`) and `layer_id` the 1-based
    index of the block, which the `"mfm"`/`"simmim"` schemes use to scale the residual outputs.
    """

    def __init__(
        self,
        hidden_dim,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        layer_norm_epsilon=1e-6,
        init="mae",
        layer_id=None,
        layer_scale=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.init = initializers.check_scheme(init)
        self.layer_id = layer_id
        self.layer_scale = None if layer_scale is None else float(layer_scale)
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.drop_path_rate = drop_path_rate
        self.layer_norm_epsilon = layer_norm_epsilon
        policy = self.dtype_policy
        self.norm1 = LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=policy, name="norm1"
        )
        self.attention = MultiHeadSelfAttention(
            hidden_dim, num_heads, qkv_bias, init=init, layer_id=layer_id, dtype=policy, name="attention"
        )
        self.norm2 = LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=policy, name="norm2"
        )
        self.fc1 = Dense(
            int(hidden_dim * mlp_ratio), kernel_initializer=initializers.linear_kernel(init), dtype=policy,
            name="fc1",
        )
        self.fc2 = Dense(
            hidden_dim, kernel_initializer=initializers.linear_kernel(init, layer_id), dtype=policy, name="fc2"
        )
        self.drop_path = keras.layers.Dropout(
            drop_path_rate, noise_shape=(None, 1, 1), dtype=policy, name="drop_path"
        )

    def build(self, input_shape):
        self.norm1.build(input_shape)
        self.attention.build(input_shape)
        self.norm2.build(input_shape)
        self.fc1.build(input_shape)
        self.fc2.build(tuple(input_shape[:-1]) + (int(self.hidden_dim * self.mlp_ratio),))
        if self.layer_scale is not None:
            init = keras.initializers.Constant(self.layer_scale)
            self.layer_scale_1 = self.add_weight(shape=(self.hidden_dim,), initializer=init, name="layer_scale_1")
            self.layer_scale_2 = self.add_weight(shape=(self.hidden_dim,), initializer=init, name="layer_scale_2")
        self.built = True

    def call(self, x, return_attention=False, training=None):
        attended = call_sublayer(
            self, self.attention, call_sublayer(self, self.norm1, x), return_attention=return_attention
        )
        if return_attention:
            attended, attention = attended
        if self.layer_scale is not None:
            attended = attended * ops.cast(self.layer_scale_1, attended.dtype)
        x = x + self._drop_path(attended, training)
        hidden = call_sublayer(self, self.fc1, call_sublayer(self, self.norm2, x))
        hidden = call_sublayer(self, self.fc2, keras.activations.gelu(hidden, approximate=False))
        if self.layer_scale is not None:
            hidden = hidden * ops.cast(self.layer_scale_2, hidden.dtype)
        x = x + self._drop_path(hidden, training)
        if return_attention:
            return x, attention
        return x

    def _drop_path(self, branch, training):
        # Without drop path the layer call is skipped (a no-op, but a Keras layer call costs
        # ~0.1 ms of Python on the eager PyTorch backend, twice per block).
        if not self.drop_path_rate:
            return branch
        return self.drop_path(branch, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio,
                "qkv_bias": self.qkv_bias,
                "drop_path_rate": self.drop_path_rate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "init": self.init,
                "layer_id": self.layer_id,
                "layer_scale": self.layer_scale,
            }
        )
        return config
