"""PyTorch-specific: the fused kernels behind `keras_mfm.layers.fused` (Dense, Conv2D, BatchNorm).

Keras' torch backend runs `Dense` as a matrix product and a separate bias addition (~3% of a
ViT-Tiny training step at batch 64 goes to those additions, forward and backward); here it is one
`torch.addmm`, which adds the bias inside the GEMM; the gradient of the `(I, O)` kernel comes out
contiguous like the kernel, with no transposed copy.

Keras' torch backend runs `Conv2D` as `permute(kernel)` (HWIO -> OIHW) and NHWC -> NCHW ->
channels-last copies of the input around `F.conv2d`, and `BatchNormalization` as ~10 generic ops.
On the MFM ResNet-50 step the kernel permutations alone (a strided 4-D copy of every kernel
forward, and of every kernel gradient backward) were ~13% of the step. Here:

- A 1x1 convolution is a matrix product: `x[:, ::s, ::s] @ K.reshape(I, O)` (+ bias): no copy of
  the kernel or of its gradient, which comes out `(I, O)`, contiguous like the kernel.
- Other kernels `(kh, kw, I, O)` become PyTorch's `(O, I, kh, kw)` weight in channels-last memory
  format, `(O, kh, kw, I)` in memory, by one 2-D transpose `(kh kw I, O) -> (O, kh kw I)`, which
  PyTorch copies blockwise (several times faster than the 4-D permutation); the gradient goes back
  the same way. With the input an NHWC tensor seen as NCHW (`permute`, no copy), oneDNN convolves
  channels-last and the output permutes back to NHWC without a copy.
- Batch normalisation is `torch.native_batch_norm` (one fused kernel each way). Its saved inverse
  standard deviation gives the biased batch variance Keras' moving average uses,
  `var = invstd^-2 - eps`.

`LayerNormalization` is `F.layer_norm`, and the attention core of `MultiHeadSelfAttention` (on the
path that computes the attention explicitly) runs as PyTorch calls: the kernels are the same as
through `keras.ops`, the Python per operation is not (~25 us per Keras op, ~12 per block).

The convolution and batch-normalisation functions take and return channels-last (NHWC) torch tensors.
"""

import torch
import torch.nn.functional as F


class _KernelToChannelsLast(torch.autograd.Function):
    """`(kh, kw, I, O)` contiguous -> `(O, I, kh, kw)` in channels-last memory format; and back."""

    @staticmethod
    def forward(ctx, kernel):
        kh, kw, cin, cout = kernel.shape
        ctx.kernel_shape = kernel.shape
        weight = kernel.reshape(kh * kw * cin, cout).t().contiguous()
        return weight.reshape(cout, kh, kw, cin).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        kh, kw, cin, cout = ctx.kernel_shape
        grad = grad.permute(0, 2, 3, 1).contiguous().reshape(cout, kh * kw * cin)
        return grad.t().contiguous().reshape(kh, kw, cin, cout)


def dense(inputs, kernel, bias):
    """`inputs` (..., I) @ `kernel` (I, O) + `bias` (O,) or None."""
    leading = inputs.shape[:-1]
    x = inputs.reshape(-1, inputs.shape[-1])
    y = torch.addmm(bias, x, kernel) if bias is not None else torch.mm(x, kernel)
    return y.reshape(*leading, kernel.shape[1])


def layer_norm(inputs, gamma, beta, epsilon):
    """Normalise over the last axis: `torch.nn.functional.layer_norm` (gamma, beta may be None)."""
    return F.layer_norm(inputs, inputs.shape[-1:], gamma, beta, epsilon)


def self_attention(qkv, num_heads, return_attention=False):
    """Multi-head self-attention from a fused projection `qkv` (B, T, 3 D) -> (B, T, D).

    `A = softmax(q k^T / sqrt(d_head))` in float32, `out = A v`; also returns `A` (B, heads, T, T)
    when asked. The same operations as `MultiHeadSelfAttention`'s explicit path, in PyTorch calls.
    """
    batch, length, width = qkv.shape
    head_dim = width // (3 * num_heads)
    q, k, v = qkv.reshape(batch, length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k, v = q.float() * head_dim**-0.5, k.float(), v.float()
    attention = torch.matmul(q, k.transpose(-2, -1)).softmax(dim=-1)
    out = torch.matmul(attention, v).transpose(1, 2).reshape(batch, length, num_heads * head_dim)
    return out.to(qkv.dtype), (attention if return_attention else None)


def conv2d(inputs, kernel, bias, strides, padding):
    """NHWC `inputs` (B, H, W, I) * HWIO `kernel` (kh, kw, I, O) (+ `bias` (O,) or None).

    `padding` is "valid" or, for stride 1 and odd kernel sizes only, "same" (symmetric).
    """
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    if kh == 1 and kw == 1:
        x = inputs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else inputs
        batch, height, width, _ = x.shape
        x = x.reshape(batch * height * width, cin)
        weight = kernel.reshape(cin, cout)
        y = torch.addmm(bias, x, weight) if bias is not None else torch.mm(x, weight)
        return y.reshape(batch, height, width, cout)
    pad = (kh // 2, kw // 2) if padding == "same" else 0
    weight = _KernelToChannelsLast.apply(kernel.contiguous())
    outputs = F.conv2d(inputs.permute(0, 3, 1, 2), weight, bias, stride=(sh, sw), padding=pad)
    return outputs.permute(0, 2, 3, 1)


def batch_norm_training(inputs, gamma, beta, epsilon):
    """Normalise NHWC `inputs` over (B, H, W) with the batch's statistics.

    Returns `(outputs, mean, variance)`; mean and (biased) variance are detached, shape (C,).
    """
    outputs, mean, invstd = torch.native_batch_norm(
        inputs.permute(0, 3, 1, 2), gamma, beta, None, None, True, 0.0, epsilon
    )
    variance = invstd.detach().pow(-2) - epsilon
    return outputs.permute(0, 2, 3, 1), mean.detach(), variance.clamp_(min=0.0)


def batch_norm_inference(inputs, gamma, beta, moving_mean, moving_variance, epsilon):
    """Normalise NHWC `inputs` with the moving statistics."""
    outputs = F.batch_norm(
        inputs.permute(0, 3, 1, 2), moving_mean, moving_variance, gamma, beta, False, 0.0, epsilon
    )
    return outputs.permute(0, 2, 3, 1)
