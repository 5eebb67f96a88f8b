"""keras_mfm.frequency against the NumPy reference of SPEC.md (tests/reference.py)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_mfm import frequency
from tests import reference
from tests.conftest import to_numpy, value_and_grad

SIZES = [(8, 8), (9, 9), (7, 10), (32, 32), (15, 16)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("radius", [0.5, 1.0, 2.3, 3.9])
@pytest.mark.parametrize("low_pass", [True, False])
def test_circular_mask_matches_reference(size, radius, low_pass):
    got = to_numpy(frequency.circular_mask(size, radius, low_pass))
    want = reference.circular_mask(*size, radius, low_pass)
    assert got.shape == size and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_circular_mask_hand_computed():
    # 5x5, centre (2, 2), radius 1.5: the centre and its 8 neighbours (distance 1 or sqrt 2 < 1.5).
    low = to_numpy(frequency.circular_mask(5, 1.5))
    want = np.zeros((5, 5))
    want[1:4, 1:4] = 1
    np.testing.assert_array_equal(low, want)
    # radius 1: only the zero frequency (distance 0 < 1), the neighbours at distance 1 are not < 1.
    only_dc = to_numpy(frequency.circular_mask((4, 6), 1.0))
    assert only_dc.sum() == 1 and only_dc[2, 3] == 1
    np.testing.assert_array_equal(to_numpy(frequency.circular_mask(5, 1.5, low_pass=False)), 1 - want)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("per_image", [False, True])
def test_frequency_filter_matches_reference(size, per_image):
    rng = np.random.default_rng(sum(size))
    images = rng.random((3, *size, 3))
    radius = frequency.default_radius(size) + 0.7
    low = reference.circular_mask(*size, radius, True)
    if per_image:
        masks = np.stack([low, 1 - low, low])
        got = frequency.frequency_filter(images.astype("float32"), masks.astype("float32"))
    else:
        masks = np.stack([1 - low] * 3)
        got = frequency.frequency_filter(images.astype("float32"), (1 - low).astype("float32"))
    want = reference.frequency_filter(images, masks)
    got = to_numpy(got)
    assert got.shape == images.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_frequency_filter_identities():
    rng = np.random.default_rng(0)
    images = rng.random((2, 16, 16, 3)).astype("float32")
    keep_all = np.ones((16, 16), "float32")
    np.testing.assert_allclose(to_numpy(frequency.frequency_filter(images, keep_all)), images, atol=1e-5)
    # keeping only the zero frequency gives each channel's mean (inside [0, 1], so the clip is a no-op)
    dc_only = to_numpy(frequency.frequency_filter(images, frequency.circular_mask(16, 0.5)))
    np.testing.assert_allclose(dc_only, np.broadcast_to(images.mean(axis=(1, 2), keepdims=True), images.shape), atol=1e-5)
    # high-pass images are about zero-mean: the clip keeps only their positive part
    high = to_numpy(frequency.frequency_filter(images, frequency.circular_mask(16, 2.0, low_pass=False)))
    assert high.min() >= 0.0 and high.max() <= 1.0 and (high == 0).mean() > 0.3


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_frequency_loss_matches_reference(size, masked, gamma):
    rng = np.random.default_rng(7 + size[0])
    pred = rng.normal(size=(2, *size, 3))
    target = rng.normal(size=(2, *size, 3))
    low = reference.circular_mask(*size, frequency.default_radius(size) + 0.5, True)
    masks = np.stack([low, 1 - low])
    got = frequency.frequency_loss(
        pred.astype("float32"), target.astype("float32"), masks.astype("float32") if masked else None, gamma
    )
    want = reference.frequency_loss(pred, target, masks if masked else None, gamma)
    assert np.shape(to_numpy(got)) == ()
    np.testing.assert_allclose(float(to_numpy(got)), want, rtol=1e-5, atol=1e-6)


def test_frequency_loss_shared_mask_and_hand_case():
    # A constant offset a on one channel lives only in the zero frequency: |P-T| = a * sqrt(HW) there.
    pred = np.zeros((1, 4, 4, 3), "float32")
    pred[..., 0] = 0.5
    target = np.zeros_like(pred)
    full = float(to_numpy(frequency.frequency_loss(pred, target)))
    # 48 (frequency, channel) pairs, one of them 0.5 * 4 = 2, the others sqrt(1e-12) = 1e-6
    np.testing.assert_allclose(full, (2.0 + 47 * 1e-6) / 48, rtol=1e-5)
    # a high-pass kept-mask masks the zero frequency: it is scored; a low-pass one keeps it: not scored
    high = frequency.circular_mask(4, 1.0, low_pass=False)
    low = frequency.circular_mask(4, 1.0, low_pass=True)
    np.testing.assert_allclose(float(to_numpy(frequency.frequency_loss(pred, target, high))), (2.0 + 2e-6) / 3, rtol=1e-5)
    np.testing.assert_allclose(float(to_numpy(frequency.frequency_loss(pred, target, low))), 1e-6, rtol=1e-3)


def test_frequency_loss_gradient_finite_and_nonzero():
    rng = np.random.default_rng(3)
    pred = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    target = ops.convert_to_tensor(rng.normal(size=(2, 8, 8, 3)).astype("float32"))
    mask = frequency.circular_mask(8, 2.0, low_pass=False)
    value, grad = value_and_grad(lambda p: frequency.frequency_loss(p, target, mask), pred)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    assert np.abs(grad).max() > 1e-4
    # pred == target: sqrt(0 + 1e-12) keeps the gradient finite
    _, grad = value_and_grad(lambda p: frequency.frequency_loss(p, ops.convert_to_tensor(pred), mask), pred)
    assert np.all(np.isfinite(grad))


def test_frequency_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(5)
    pred = rng.normal(size=(1, 6, 6, 1))
    target = rng.normal(size=(1, 6, 6, 1))
    mask = reference.circular_mask(6, 6, 1.5, low_pass=False)[None]
    _, grad = value_and_grad(
        lambda p: frequency.frequency_loss(p, target.astype("float32"), mask.astype("float32")), pred
    )
    eps = 1e-4
    for index in [(0, 0, 0, 0), (0, 2, 3, 0), (0, 5, 1, 0)]:
        up, down = pred.copy(), pred.copy()
        up[index] += eps
        down[index] -= eps
        numeric = (reference.frequency_loss(up, target, mask) - reference.frequency_loss(down, target, mask)) / (2 * eps)
        np.testing.assert_allclose(grad[index], numeric, rtol=1e-2, atol=1e-5)


def test_default_radius():
    assert frequency.default_radius(224) == pytest.approx(16.0)
    assert frequency.default_radius(32) == pytest.approx(16 / 7)
    assert frequency.default_radius((64, 32)) == pytest.approx(16 / 7)


@pytest.mark.parametrize("radius", [0, -1.0, float("nan")])
def test_bad_radius(radius):
    with pytest.raises(ValueError, match="radius"):
        frequency.circular_mask(32, radius)


def test_radius_larger_than_spectrum():
    frequency.circular_mask(32, frequency.max_radius(32))  # the largest valid radius
    with pytest.raises(ValueError, match="larger than the spectrum"):
        frequency.circular_mask(32, 23.0)


def test_bad_shapes():
    images = np.zeros((2, 8, 8, 3), "float32")
    with pytest.raises(ValueError, match="rank 4"):
        frequency.frequency_filter(images[0], np.ones((8, 8), "float32"))
    with pytest.raises(ValueError, match="mask"):
        frequency.frequency_filter(images, np.ones((8, 9), "float32"))
    with pytest.raises(ValueError, match="same shape"):
        frequency.frequency_loss(images, np.zeros((2, 8, 8, 1), "float32"))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    rng = np.random.default_rng(1)
    images = rng.random((2, 8, 8, 3)).astype("float32")
    mask = frequency.circular_mask(8, 2.0)
    low = frequency.frequency_filter(ops.cast(images, dtype), mask)
    assert keras.backend.standardize_dtype(low.dtype) == "float32"
    loss = frequency.frequency_loss(ops.cast(images, dtype), ops.zeros_like(ops.cast(images, dtype)), mask)
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
