"""keras_mfm.corruptions: hand-computed values and independent NumPy references."""

import keras
import numpy as np
import pytest

from keras_mfm import corruptions
from tests import reference
from tests.conftest import smooth_images, to_numpy


def numpy_kernel(sigma):
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    return kernel / kernel.sum()


def numpy_blur(images, sigma):
    """Separable blur with np.pad(mode="reflect") and an explicit correlation loop, float64."""
    kernel = numpy_kernel(sigma)
    radius = len(kernel) // 2
    _, height, width, _ = images.shape
    padded = np.pad(images.astype(np.float64), ((0, 0), (radius, radius), (0, 0), (0, 0)), mode="reflect")
    rows = sum(w * padded[:, k : k + height] for k, w in enumerate(kernel))
    padded = np.pad(rows, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode="reflect")
    return np.clip(sum(w * padded[:, :, k : k + width] for k, w in enumerate(kernel)), 0, 1)


def mean_abs_change(out, images):
    return float(np.mean(np.abs(np.asarray(to_numpy(out), np.float64) - images)))


# ---------------------------------------------------------------------------------------------
# contrast


def test_contrast_hand_computed():
    # Per-image mean over H, W, C: (0.2 + 0.4 + 0.6 + 0.8 + 0.0 + 0.4) / 6 = 0.4.
    image = np.array([[[[0.2, 0.4, 0.6], [0.8, 0.0, 0.4]]]], dtype=np.float32)
    assert image.shape == (1, 1, 2, 3)
    half = to_numpy(corruptions.contrast(image, 0.5))
    np.testing.assert_allclose(half, [[[[0.3, 0.4, 0.5], [0.6, 0.2, 0.4]]]], atol=1e-6)
    # factor 2: 1.2 and -0.4 are clipped to 1 and 0.
    double = to_numpy(corruptions.contrast(image, 2.0))
    np.testing.assert_allclose(double, [[[[0.0, 0.4, 0.8], [1.0, 0.0, 0.4]]]], atol=1e-6)
    assert half.dtype == np.float32 and half.shape == image.shape


def test_contrast_mean_is_per_image():
    images = np.stack([np.full((2, 2, 3), 0.2), np.full((2, 2, 3), 0.8)]).astype(np.float32)
    images[1, 0, 0, 0] = 0.4  # mean of image 1: (11 * 0.8 + 0.4) / 12
    out = to_numpy(corruptions.contrast(images, 0.0))
    np.testing.assert_allclose(out[0], 0.2, atol=1e-6)
    np.testing.assert_allclose(out[1], (11 * 0.8 + 0.4) / 12, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# gaussian_blur


def test_blur_of_interior_delta_is_outer_product_of_kernel():
    sigma = 1.5  # radius ceil(4.5) = 5, kernel size 11
    kernel = numpy_kernel(sigma)
    assert len(kernel) == 11
    image = np.zeros((1, 21, 21, 1), dtype=np.float32)
    image[0, 10, 10, 0] = 1.0
    out = to_numpy(corruptions.gaussian_blur(image, sigma))
    want = np.zeros((21, 21))
    want[5:16, 5:16] = np.outer(kernel, kernel)
    np.testing.assert_allclose(out[0, :, :, 0], want, atol=1e-6)
    np.testing.assert_allclose(out.sum(), 1.0, atol=1e-5)


def test_blur_is_per_channel_and_keeps_the_sum_of_interior_deltas():
    images = np.zeros((2, 32, 32, 3), dtype=np.float32)
    images[0, 8, 12, 0] = 0.9
    images[0, 24, 9, 2] = 0.5
    images[1, 16, 16, 1] = 0.7
    out = to_numpy(corruptions.gaussian_blur(images, 1.0))
    np.testing.assert_allclose(out.sum(axis=(1, 2)), images.sum(axis=(1, 2)), atol=1e-5)
    assert out[0, :, :, 1].max() == 0 and out[1, :, :, 0].max() == 0 and out[1, :, :, 2].max() == 0


@pytest.mark.parametrize("sigma, size", [(0.7, 32), (1.0, 32), (3.0, 4)])
def test_blur_of_constant_is_constant(sigma, size):
    # Reflect padding: no darkening at the borders, even when the kernel is larger than the image.
    image = np.full((2, size, size, 3), 0.37, dtype=np.float32)
    np.testing.assert_allclose(to_numpy(corruptions.gaussian_blur(image, sigma)), image, atol=1e-6)


def test_blur_matches_numpy_reflect_reference():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 9, 12, 3)).astype(np.float32)
    for sigma in (0.4, 1.0, 2.5):  # radius 2, 3 and 8 (reflection past a 9-pixel side)
        got = to_numpy(corruptions.gaussian_blur(images, sigma))
        np.testing.assert_allclose(got, numpy_blur(images, sigma), atol=1e-6)


def test_blur_sigma_zero_is_identity():
    images = np.random.default_rng(1).uniform(size=(2, 6, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(to_numpy(corruptions.gaussian_blur(images, 0.0)), images)


# ---------------------------------------------------------------------------------------------
# gaussian_noise


# One shape for every noise test (JAX compiles the sampler once per shape).
NOISE_SHAPE = (2, 32, 32, 3)


def test_noise_same_seed_same_output():
    images = np.full(NOISE_SHAPE, 0.5, dtype=np.float32)
    first = to_numpy(corruptions.gaussian_noise(images, 0.1, seed=3))
    np.testing.assert_array_equal(first, to_numpy(corruptions.gaussian_noise(images, 0.1, seed=3)))
    assert not np.array_equal(first, to_numpy(corruptions.gaussian_noise(images, 0.1, seed=4)))
    a = to_numpy(corruptions.gaussian_noise(images, 0.1, seed=keras.random.SeedGenerator(7)))
    b = to_numpy(corruptions.gaussian_noise(images, 0.1, seed=keras.random.SeedGenerator(7)))
    np.testing.assert_array_equal(a, b)


def test_noise_statistics_match_sigma():
    # 6144 samples: standard errors ~1.3% of sigma for the mean, ~0.9% for the std; mid-grey
    # clips only beyond 5 sigma.
    images = np.full(NOISE_SHAPE, 0.5, dtype=np.float32)
    sigma = 0.1
    for seed in (0, 1):
        out = to_numpy(corruptions.gaussian_noise(images, sigma, seed=seed))
        diff = out.astype(np.float64) - images
        assert out.dtype == np.float32 and out.shape == images.shape
        assert abs(diff.mean()) < 0.05 * sigma
        assert abs(diff.std() / sigma - 1) < 0.04


def test_noise_is_clipped():
    images = np.random.default_rng(2).uniform(size=NOISE_SHAPE).astype(np.float32)
    out = to_numpy(corruptions.gaussian_noise(images, 0.5, seed=1))
    assert out.min() == 0.0 and out.max() == 1.0  # strong noise: both bounds reached


# ---------------------------------------------------------------------------------------------
# jpeg


def test_jpeg_constant_survives_high_quality():
    images = np.full((2, 16, 16, 3), 0.5, dtype=np.float32)
    images[1] = 0.2
    out = corruptions.jpeg(images, 95)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == images.shape
    np.testing.assert_allclose(out, images, atol=2 / 255)


def test_jpeg_range_and_quality_ordering():
    images = smooth_images(2, 32, seed=3)
    noisy = np.clip(images + np.random.default_rng(3).normal(0, 0.05, images.shape), 0, 1).astype(np.float32)
    high, low = corruptions.jpeg(noisy, 95), corruptions.jpeg(noisy, 10)
    for out in (high, low):
        assert out.shape == noisy.shape and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 1
    assert np.abs(low - noisy).mean() > 2 * np.abs(high - noisy).mean()
    grey = corruptions.jpeg(np.full((1, 8, 8, 1), 0.6, dtype=np.float32), 90)
    assert grey.shape == (1, 8, 8, 1)


@pytest.mark.parametrize("quality", [0, 96, 50.0, True])
def test_jpeg_rejects_bad_quality(quality):
    with pytest.raises(ValueError, match="quality"):
        corruptions.jpeg(np.zeros((1, 8, 8, 3), np.float32), quality)


# ---------------------------------------------------------------------------------------------
# low_pass / high_pass


def test_low_pass_with_radius_covering_everything_is_identity():
    images = np.random.default_rng(4).uniform(0.1, 0.9, size=(2, 32, 32, 3)).astype(np.float32)
    # The farthest frequency lies hypot(16, 16) ~ 22.6 from the centre; radius 32 keeps all.
    np.testing.assert_allclose(to_numpy(corruptions.low_pass(images, 32.0)), images, atol=1e-5)


def test_low_and_high_pass_of_constant_is_constant():
    images = np.full((2, 32, 32, 3), 0.3, dtype=np.float32)
    images[1] = 0.8
    for radius in (0.5, 2.0, 6.0):
        np.testing.assert_allclose(to_numpy(corruptions.low_pass(images, radius)), images, atol=1e-5)
        np.testing.assert_allclose(to_numpy(corruptions.high_pass(images, radius)), images, atol=1e-5)


def test_low_plus_high_minus_mean_is_identity():
    images = (0.5 + 0.4 * (smooth_images(2, 32, seed=5) - 0.5)).astype(np.float32)  # in [0.3, 0.7]
    mean = images.mean(axis=(1, 2), keepdims=True)  # per image and channel
    for radius in (1.5, 4.0, 9.0):
        low = to_numpy(corruptions.low_pass(images, radius))
        high = to_numpy(corruptions.high_pass(images, radius))
        assert 0 < low.min() and low.max() < 1 and 0 < high.min() and high.max() < 1  # no clipping
        np.testing.assert_allclose(low + high - mean, images, atol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (15, 16)])
@pytest.mark.parametrize("radius", [1.0, 2.5, 5.6, 11.2])
def test_low_and_high_pass_match_numpy_reference(size, radius):
    rng = np.random.default_rng(int(radius * 10))
    images = rng.uniform(size=(2, *size, 3))
    height, width = size
    low_mask = reference.circular_mask(height, width, radius)  # strict |k| < radius
    high_mask = 1.0 - low_mask
    high_mask[height // 2, width // 2] = 1.0  # DC kept
    want_low = reference.frequency_filter(images, np.stack([low_mask] * 2))
    want_high = reference.frequency_filter(images, np.stack([high_mask] * 2))
    got_low = to_numpy(corruptions.low_pass(images.astype(np.float32), radius))
    got_high = to_numpy(corruptions.high_pass(images.astype(np.float32), radius))
    np.testing.assert_allclose(got_low, want_low, atol=1e-5)
    np.testing.assert_allclose(got_high, want_high, atol=1e-5)


def test_high_pass_keeps_the_per_channel_mean():
    images = np.random.default_rng(6).uniform(0.3, 0.7, size=(2, 32, 32, 3)).astype(np.float32)
    high = to_numpy(corruptions.high_pass(images, 3.0))
    # Without clipping the mean would be exact; with clipping it is close.
    np.testing.assert_allclose(high.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=0.02)


# ---------------------------------------------------------------------------------------------
# registry and corrupt()


def test_corrupt_rejects_unknown_name():
    with pytest.raises(ValueError, match="gaussian_noise") as info:
        corruptions.corrupt(np.zeros((1, 8, 8, 3), np.float32), "fog", 1)
    for name in corruptions.CORRUPTIONS:
        assert name in str(info.value)


@pytest.mark.parametrize("severity", [0, 6, 2.0, True])
def test_corrupt_rejects_bad_severity(severity):
    with pytest.raises(ValueError, match="severity"):
        corruptions.corrupt(np.zeros((1, 8, 8, 3), np.float32), "contrast", severity)
    with pytest.raises(ValueError, match="severity"):
        corruptions.corruption_parameter("contrast", severity, 32)


def test_corruption_parameter_scaling():
    assert corruptions.corruption_parameter("gaussian_noise", 5, 224) == 0.10
    assert corruptions.corruption_parameter("jpeg", 1, 64) == 80
    assert corruptions.corruption_parameter("contrast", 2, 32) == 0.5
    assert corruptions.corruption_parameter("gaussian_blur", 5, 32) == pytest.approx(1.0)
    assert corruptions.corruption_parameter("gaussian_blur", 5, 64) == pytest.approx(2.0)
    assert corruptions.corruption_parameter("gaussian_blur", 1, (64, 96)) == pytest.approx(0.8)
    assert corruptions.corruption_parameter("low_pass", 1, 32) == pytest.approx(11.2)
    assert corruptions.corruption_parameter("high_pass", 5, (32, 48)) == pytest.approx(5.6)
    assert corruptions.corruption_parameter("high_pass", 1, 32) == pytest.approx(1.28)


def test_every_corruption_runs_and_severity_5_is_stronger():
    rng = np.random.default_rng(7)
    images = (0.7 * smooth_images(2, 32, seed=7) + 0.3 * rng.uniform(size=(2, 32, 32, 3))).astype(np.float32)
    for name in corruptions.CORRUPTIONS:
        changes = []
        for severity in (1, 5):
            out = to_numpy(corruptions.corrupt(images, name, severity, seed=11))
            assert out.shape == (2, 32, 32, 3), name
            assert out.dtype == np.float32, name
            assert out.min() >= 0 and out.max() <= 1, name
            changes.append(mean_abs_change(out, images))
        assert changes[1] > changes[0] > 0.005, (name, changes)  # even severity 1 changes the images
