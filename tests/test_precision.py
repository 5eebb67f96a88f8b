"""Mixed precision (`train.py --precision`): a training step of every model family runs with a finite
loss under mixed_bfloat16 and mixed_float16 (loss-scaled), while every FFT, the losses and the FAMT
importance stay float32; and the resolved jit/precision settings are recorded by a run."""

import json
import os

import keras
import numpy as np
import pytest

from keras_mfm import data, training
from keras_mfm.importance import ImportanceScorer
from keras_mfm.models.token_masking import whole_image_inputs
from tests.conftest import BACKEND, smooth_images, to_numpy
from tests.test_data import write_folder

POLICIES = ("mixed_bfloat16", "mixed_float16")
FFT_OPS = ("fft", "fft2", "ifft2", "rfft", "irfft")


@pytest.fixture
def fft_dtypes(monkeypatch):
    """Records the dtype of every input of the `keras.ops` FFTs called while the test runs."""
    seen = []
    for name in FFT_OPS:
        original = getattr(keras.ops, name, None)
        if original is None:
            continue

        def spy(x, *args, _original=original, **kwargs):
            parts = x if isinstance(x, (tuple, list)) else (x,)
            seen.extend(keras.backend.standardize_dtype(p.dtype) for p in parts)
            return _original(x, *args, **kwargs)

        monkeypatch.setattr(keras.ops, name, spy)
    return seen


@pytest.fixture
def policy(request):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy(previous)


def jax_on_cpu():
    import jax

    return jax.default_backend() == "cpu"


def config(method, **overrides):
    values = dict(method=method, depth=1, image_size=16, patch_size=4, batch_size=4, decoder_dim=32,
                  decoder_depth=1, decoder_heads=2, lr=1e-3)
    values.update(overrides)
    return training.PretrainConfig(**values)


def step(method, policy_name, images):
    """Two training steps through the run's own model and optimizer (training._new_model); the FFT
    spy sees every call while the step is traced (TensorFlow, JAX) or run (PyTorch)."""
    model = training._new_model(config(method, precision=policy_name), num_images=len(images), steps=2,
                                total_steps=2)
    if method == "famt":  # as train.py feeds it: each batch with its rows of the host table
        import tensorflow as tf

        images = tf.data.Dataset.from_tensor_slices(whole_image_inputs(images)).batch(4)
        if model.host_table is not None:
            images = data.with_importance(images, model)
        history = model.fit(images, epochs=1, verbose=0)
    else:
        history = model.fit(images, batch_size=4, epochs=1, verbose=0, shuffle=False)
    return model, history.history["loss"]


@pytest.mark.parametrize("method,policy", [
    ("mfm", "mixed_bfloat16"), ("mfm", "mixed_float16"), ("famt", "mixed_bfloat16"), ("famt", "mixed_float16"),
    ("simmim", "mixed_bfloat16"),
], indirect=["policy"])
def test_mixed_precision_step_is_finite_and_keeps_ffts_and_loss_in_float32(method, policy, fft_dtypes):
    if BACKEND == "jax" and policy == "mixed_float16" and jax_on_cpu():
        with pytest.raises(ValueError, match="mixed_float16 is not supported by JAX on CPU"):
            step(method, policy, smooth_images(8, 16))
        return
    model, losses = step(method, policy, smooth_images(8, 16))
    assert np.all(np.isfinite(losses)), losses
    assert model.dtype_policy.name == policy and model.encoder.compute_dtype == policy.split("_")[1]
    assert all(keras.backend.standardize_dtype(v.dtype) == "float32" for v in model.trainable_variables)
    # float16 needs loss scaling (Keras wraps the optimizer); bfloat16 has float32's range
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
    if method in ("mfm", "sr"):
        assert fft_dtypes and set(fft_dtypes) == {"float32"}, fft_dtypes
    x = smooth_images(4, 16)
    inputs = whole_image_inputs(x) if method == "famt" else x
    loss = model.compute_loss(x=inputs, y_pred=model(inputs, training=True))
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_importance_is_scored_in_float32(policy, fft_dtypes):
    model = training.build_model(config("famt", precision=policy), num_images=4)
    scores = ImportanceScorer(model.encoder, "famt")(smooth_images(4, 16))
    assert keras.backend.standardize_dtype(scores.dtype) == "float32"
    assert fft_dtypes and set(fft_dtypes) == {"float32"}, fft_dtypes  # FAMT's low-frequency energy
    assert np.all(np.isfinite(to_numpy(scores))) and np.all(to_numpy(scores) >= 0)


def test_run_records_precision_jit_and_distribution(tmp_path):
    root = write_folder(str(tmp_path / "set"), per_class=4)
    output = str(tmp_path / "run")
    previous = keras.config.dtype_policy().name
    result = training.pretrain(config("mfm", data=root, precision="mixed_bfloat16", output=output, eval="none",
                                      verbose=0, epochs=1))
    assert keras.config.dtype_policy().name == previous  # the run restores the global policy
    info = json.load(open(os.path.join(output, "config.json")))
    assert info["precision"] == "mixed_bfloat16" and info["loss_scaling"] is False
    assert info["jit_compile"] is (BACKEND == "jax")  # Keras' auto: XLA on JAX; TF only with an accelerator
    assert info["distribution"]["kind"] == "single" and info["distribution"]["num_replicas"] == 1
    encoder = keras.saving.load_model(result["encoder_path"])
    assert encoder.dtype_policy.name == "mixed_bfloat16"


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown --precision 'float16'"):
        training.validate(config("mfm", precision="float16"))
