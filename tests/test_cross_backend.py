"""Weights move across backends: an encoder saved under this backend loads under the two others."""

import os

import keras
import numpy as np
import pytest

from keras_mfm import backbones
from tests.conftest import BACKEND, to_numpy
from tests.helpers_subprocess import run_python

LOAD_AND_FEATURES = """
import sys, numpy as np, keras, keras_mfm
encoder = keras.saving.load_model(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], keras.ops.convert_to_numpy(encoder(x)))
"""


def _check(tmp_path, encoder, size):
    x = np.random.default_rng(0).random((2, size, size, 3)).astype("float32")
    want = to_numpy(encoder(x))
    path = os.path.join(tmp_path, "encoder.keras")
    encoder.save(path)
    np.save(os.path.join(tmp_path, "x.npy"), x)
    for other in sorted({"tensorflow", "jax", "torch"} - {BACKEND}):
        out = os.path.join(tmp_path, f"{other}.npy")
        result = run_python(["-c", LOAD_AND_FEATURES, path, os.path.join(tmp_path, "x.npy"), out], other)
        assert result.returncode == 0, result.stderr[-3000:]
        np.testing.assert_allclose(np.load(out), want, atol=1e-4, err_msg=f"{BACKEND} -> {other}")


@pytest.mark.slow_on("jax", "tensorflow")  # it runs every backend in subprocesses: once is enough by default
def test_vit_encoder_moves_across_backends(tmp_path):
    keras.utils.set_random_seed(0)
    encoder = backbones.ViTBackbone(image_size=16, patch_size=4, hidden_dim=32, depth=2, num_heads=4)
    _check(tmp_path, encoder, 16)


@pytest.mark.slow
def test_resnet50_encoder_moves_across_backends(tmp_path):
    keras.utils.set_random_seed(0)
    _check(tmp_path, backbones.get_backbone("resnet50", image_size=32), 32)
