"""`Dense`, `LayerNormalization`, `Conv2D`, `BatchNormalization`: Keras' layers, PyTorch's kernels on torch.

Same arguments, weights (`(I, O)` and HWIO kernels, biases; gamma, beta, moving mean and
variance), config and numbers as `keras.layers.Dense` / `Conv2D` / `BatchNormalization`, so a
network built from either loads the other's weights on any backend. On TensorFlow and JAX, and on
PyTorch whenever a case below does not hold, they are exactly Keras' layers. On PyTorch
(`keras_mfm.backend.torch.layers`):

- `Dense` (not quantised, no LoRA, inputs of the kernel's dtype): `x @ K + b` as one
  `torch.addmm` (Keras adds the bias in a second pass over the output).
- `LayerNormalization` (last axis, no RMS scaling, float32): `F.layer_norm` without the Python of
  Keras' op.

and for channels-last float inputs of rank 4:

- `Conv2D` (no groups or dilation; padding "valid", or "same" at stride 1 with odd kernels): a
  1x1 convolution is `x[:, ::s, ::s] @ K` (+ b); larger kernels convolve channels-last in oneDNN
  with the kernel re-laid out by one 2-D transpose, instead of Keras' 4-D kernel permutation and
  three input/output layout copies.
- `BatchNormalization` (axis -1, no mask, renorm or synchronisation; float32): PyTorch's fused
  batch norm, with Keras' moving-average update
  `moving = moving * momentum + batch_statistic * (1 - momentum)` (biased batch variance).

Measured on the ViT and MFM ResNet-50 training steps (`benchmarks/throughput.py`, see the README).
"""

import keras
from keras import ops

from keras_mfm import backend


def _torch():
    return backend.ON_TORCH


def _same_dtype(inputs, *weights):
    """Whether every weight (None: absent) has the inputs' dtype, as the PyTorch calls need."""
    return all(w is None or w.dtype == inputs.dtype for w in weights)


@keras.saving.register_keras_serializable(package="keras_mfm")
class Dense(keras.layers.Dense):
    """`keras.layers.Dense`, with the bias added inside the matrix product on PyTorch."""

    def call(self, inputs, training=None):
        if not _torch() or self.quantization_mode is not None or self.lora_enabled:
            return super().call(inputs, training=training)
        from keras_mfm.backend.torch import layers as fused_torch

        inputs = ops.convert_to_tensor(inputs)
        kernel = ops.convert_to_tensor(self._kernel)
        bias = ops.convert_to_tensor(self.bias) if self.bias is not None else None
        if not _same_dtype(inputs, kernel, bias):
            return super().call(inputs, training=training)
        outputs = fused_torch.dense(inputs, kernel, bias)
        if self.activation is not None:
            return self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package="keras_mfm")
class LayerNormalization(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization`, as `F.layer_norm` on PyTorch."""

    def call(self, inputs):
        rank = len(inputs.shape)
        if (
            not _torch()
            or self.rms_scaling
            or [a % rank for a in self.axis] != [rank - 1]
            or keras.backend.standardize_dtype(inputs.dtype) != "float32"
            or self.compute_dtype != "float32"
        ):
            return super().call(inputs)
        from keras_mfm.backend.torch import layers as fused_torch

        gamma = ops.convert_to_tensor(self.gamma) if self.gamma is not None else None
        beta = ops.convert_to_tensor(self.beta) if self.beta is not None else None
        return fused_torch.layer_norm(ops.convert_to_tensor(inputs), gamma, beta, self.epsilon)


@keras.saving.register_keras_serializable(package="keras_mfm")
class Conv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D`, as a matrix product / channels-last oneDNN call on PyTorch."""

    def _torch_fast_path(self, inputs):
        if not _torch() or self.data_format != "channels_last" or len(inputs.shape) != 4:
            return False
        if self.groups != 1 or tuple(self.dilation_rate) != (1, 1):
            return False
        if self.padding == "same":
            odd = all(k % 2 == 1 for k in self.kernel_size)
            return odd and tuple(self.strides) == (1, 1)
        return self.padding == "valid"

    def call(self, inputs):
        if not self._torch_fast_path(inputs):
            return super().call(inputs)
        from keras_mfm.backend.torch import layers as fused_torch

        inputs = ops.convert_to_tensor(inputs)
        kernel = ops.convert_to_tensor(self.kernel)
        bias = ops.convert_to_tensor(self.bias) if self.use_bias else None
        if not _same_dtype(inputs, kernel, bias):
            return super().call(inputs)
        outputs = fused_torch.conv2d(inputs, kernel, bias, tuple(self.strides), self.padding)
        if self.activation is not None:
            return self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package="keras_mfm")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization`, as PyTorch's fused batch norm on PyTorch."""

    def _torch_fast_path(self, inputs, mask):
        return (
            _torch()
            and mask is None
            and len(inputs.shape) == 4
            and self.axis % 4 == 3
            and not self.renorm
            and not self.synchronized
            and keras.backend.standardize_dtype(inputs.dtype) == "float32"
            and self.moving_mean.dtype == "float32"
        )

    def call(self, inputs, training=None, mask=None):
        if not self._torch_fast_path(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        from keras_mfm.backend.torch import layers as fused_torch

        inputs = ops.convert_to_tensor(inputs)
        gamma = ops.convert_to_tensor(self.gamma) if self.scale else None
        beta = ops.convert_to_tensor(self.beta) if self.center else None
        if training and self.trainable:
            outputs, mean, variance = fused_torch.batch_norm_training(
                inputs, gamma, beta, self.epsilon
            )
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
        else:
            outputs = fused_torch.batch_norm_inference(
                inputs, gamma, beta,
                ops.convert_to_tensor(self.moving_mean), ops.convert_to_tensor(self.moving_variance),
                self.epsilon,
            )
        return ops.cast(outputs, self.compute_dtype)
