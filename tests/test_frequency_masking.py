import keras
import numpy as np
import pytest

from keras_mfm import frequency
from keras_mfm.layers import FrequencyMasking
from tests import reference
from tests.conftest import to_numpy
from tests.harness import check_layer_serialization


def test_masks_are_low_or_high_pass_and_images_filtered():
    layer = FrequencyMasking(radius=3.0, p_low=0.5, seed=1)
    images = np.random.default_rng(0).random((16, 16, 16, 3)).astype("float32")
    corrupted, mask = layer(images)
    corrupted, mask = to_numpy(corrupted), to_numpy(mask)
    low = reference.circular_mask(16, 16, 3.0)
    is_low = np.array([np.array_equal(m, low) for m in mask])
    is_high = np.array([np.array_equal(m, 1 - low) for m in mask])
    assert np.all(is_low ^ is_high) and 0 < is_low.sum() < 16
    np.testing.assert_allclose(corrupted, reference.frequency_filter(images.astype("float64"), mask), atol=1e-5)


@pytest.mark.parametrize("p_low", [0.0, 0.3, 1.0])
def test_low_pass_probability(p_low):
    layer = FrequencyMasking(p_low=p_low, seed=3)
    images = np.zeros((400, 8, 8, 3), "float32")
    _, mask = layer(images)
    low = reference.circular_mask(8, 8, frequency.default_radius(8))
    fraction = np.mean([np.array_equal(m, low) for m in to_numpy(mask)])
    # binomial(400, p): 4 standard deviations at most 0.1
    assert abs(fraction - p_low) < 0.1


def test_seeded_and_random_across_calls():
    images = np.random.default_rng(0).random((32, 8, 8, 3)).astype("float32")
    first = to_numpy(FrequencyMasking(seed=5)(images)[1])
    again = to_numpy(FrequencyMasking(seed=5)(images)[1])
    np.testing.assert_array_equal(first, again)
    layer = FrequencyMasking(seed=5)
    a, b = to_numpy(layer(images)[1]), to_numpy(layer(images)[1])
    assert not np.array_equal(a, b)


def test_default_radius_scales_with_image_size():
    layer = FrequencyMasking(seed=0)
    layer.build((None, 32, 32, 3))
    assert layer.effective_radius((32, 32)) == pytest.approx(16 / 7)


def test_serialization_round_trip():
    layer = FrequencyMasking(radius=2.5, p_low=0.3, seed=7, name="fm")
    clone = check_layer_serialization(layer)
    assert (clone.radius, clone.p_low, clone.seed, clone.name) == (2.5, 0.3, 7, "fm")


def test_bad_arguments():
    with pytest.raises(ValueError, match="p_low"):
        FrequencyMasking(p_low=1.5)
    with pytest.raises(ValueError, match="radius"):
        FrequencyMasking(radius=-1)
    with pytest.raises(ValueError, match="larger than the spectrum"):
        FrequencyMasking(radius=40)(np.zeros((1, 32, 32, 3), "float32"))


# --- band (outer_radius) ---


def _low_version(mask):
    """The low-pass/band-stop form of a kept-mask: a low-pass draw keeps the zero frequency."""
    height, width = mask.shape
    return mask if mask[height // 2, width // 2] == 1 else 1 - mask


def test_band_masks_are_band_stop_or_band_pass():
    layer = FrequencyMasking(radius=1.5, outer_radius=3.0, p_low=0.5, seed=2)
    images = np.random.default_rng(1).random((16, 9, 9, 3)).astype("float32")
    corrupted, mask = (to_numpy(x) for x in layer(images))
    stop = reference.band_mask(9, 9, 1.5, 3.0, low_pass=True)
    is_stop = np.array([np.array_equal(m, stop) for m in mask])
    is_pass = np.array([np.array_equal(m, 1 - stop) for m in mask])
    assert np.all(is_stop ^ is_pass) and 0 < is_stop.sum() < 16
    np.testing.assert_allclose(corrupted, reference.frequency_filter(images.astype("float64"), mask), atol=1e-5)


def test_outer_radius_beyond_spectrum_has_no_effect():
    images = np.random.default_rng(0).random((8, 12, 12, 3)).astype("float32")
    plain = [to_numpy(x) for x in FrequencyMasking(radius=2.0, seed=4)(images)]
    for outer in [999.0, frequency.max_radius(12) + 0.01]:
        banded = [to_numpy(x) for x in FrequencyMasking(radius=2.0, outer_radius=outer, seed=4)(images)]
        np.testing.assert_array_equal(banded[1], plain[1])
        np.testing.assert_allclose(banded[0], plain[0], atol=1e-6)


def test_bad_outer_radius():
    with pytest.raises(ValueError, match=r"`outer_radius`=2.0 must be larger than `radius`=2.0"):
        FrequencyMasking(radius=2.0, outer_radius=2.0)
    with pytest.raises(ValueError, match="outer_radius.*must be larger than.*radius"):
        FrequencyMasking(radius=3.0, outer_radius=1.0)
    with pytest.raises(ValueError, match="outer_radius.*must be larger than.*radius"):
        FrequencyMasking(outer_radius=-1.0)
    # the default radius (16/7 at 32x32) is only known at build time
    with pytest.raises(ValueError, match="outer_radius.*must be larger than.*radius"):
        FrequencyMasking(outer_radius=2.0)(np.zeros((1, 32, 32, 3), "float32"))
    with pytest.raises(ValueError, match="outer_radius.*must be larger than.*radius_range"):
        FrequencyMasking(radius_range=(1.0, 3.0), outer_radius=3.0)
    with pytest.raises(ValueError, match="outer_radius"):
        FrequencyMasking(radius=1.0, outer_radius="far")


# --- random radius (radius_range) ---


def test_random_radius_masks_are_circles_with_radii_in_range():
    layer = FrequencyMasking(radius_range=(1.0, 4.0), p_low=0.5, seed=6)
    images = np.random.default_rng(2).random((48, 11, 11, 3)).astype("float32")
    corrupted, mask = (to_numpy(x) for x in layer(images))
    assert mask.shape == (48, 11, 11) and mask.dtype == np.float32
    candidates = reference.circular_masks_in_range(11, 11, 1.0, 4.0)
    lows = [_low_version(m) for m in mask]
    assert all(any(np.array_equal(low, c) for c in candidates) for low in lows)
    # the kept low-pass count identifies the radius: the radii vary across images
    assert len({int(low.sum()) for low in lows}) >= 4
    is_low = np.array([m[5, 5] == 1 for m in mask])
    assert 0 < is_low.sum() < 48
    np.testing.assert_allclose(corrupted, reference.frequency_filter(images.astype("float64"), mask), atol=1e-5)


def test_random_radius_with_band():
    layer = FrequencyMasking(radius_range=(1.0, 3.0), outer_radius=4.0, seed=8)
    _, mask = layer(np.zeros((32, 11, 11, 1), "float32"))
    # r1 drawn in [1, 3), r2 = 4: the low-pass draw keeps |k| < r1 or |k| >= 4
    candidates = [reference.band_mask(11, 11, r, 4.0, low_pass=True)
                  for r in reference.radii_in_range(11, 11, 1.0, 3.0)]
    lows = [_low_version(m) for m in to_numpy(mask)]
    assert all(any(np.array_equal(low, c) for c in candidates) for low in lows)
    assert len({int(low.sum()) for low in lows}) >= 3


def test_random_radius_seeded_and_random_across_calls():
    images = np.zeros((16, 9, 9, 1), "float32")
    first = to_numpy(FrequencyMasking(radius_range=(1.0, 4.0), seed=5)(images)[1])
    again = to_numpy(FrequencyMasking(radius_range=(1.0, 4.0), seed=5)(images)[1])
    other = to_numpy(FrequencyMasking(radius_range=(1.0, 4.0), seed=6)(images)[1])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    layer = FrequencyMasking(radius_range=(1.0, 4.0), seed=5)
    assert not np.array_equal(to_numpy(layer(images)[1]), to_numpy(layer(images)[1]))


def test_random_radius_in_a_compiled_model():
    inputs = keras.Input((9, 9, 3))
    model = keras.Model(inputs, FrequencyMasking(radius_range=(1.0, 3.0), outer_radius=4.0, seed=1)(inputs))
    images = np.random.default_rng(3).random((8, 9, 9, 3)).astype("float32")
    corrupted, mask = model.predict(images, batch_size=4, verbose=0)
    assert corrupted.shape == images.shape and mask.shape == (8, 9, 9)
    np.testing.assert_allclose(corrupted, reference.frequency_filter(images.astype("float64"), mask), atol=1e-5)


@pytest.mark.parametrize(
    "radius_range, match",
    [
        ((0.0, 2.0), "0 < r_min < r_max"),
        ((-1.0, 2.0), "0 < r_min < r_max"),
        ((3.0, 2.0), "0 < r_min < r_max"),
        ((2.0, 2.0), "0 < r_min < r_max"),
        ((1.0, float("inf")), "0 < r_min < r_max"),
        ((1.0, float("nan")), "radius_range"),
        ((1.0,), "pair"),
        (2.0, "pair"),
        ("ab", "pair"),
    ],
)
def test_bad_radius_range(radius_range, match):
    with pytest.raises(ValueError, match=match):
        FrequencyMasking(radius_range=radius_range)


def test_radius_and_radius_range_are_exclusive():
    with pytest.raises(ValueError, match="either a fixed `radius`.*or a random `radius_range`"):
        FrequencyMasking(radius=2.0, radius_range=(1.0, 3.0))


def test_radius_range_larger_than_spectrum():
    with pytest.raises(ValueError, match="larger than the spectrum"):
        FrequencyMasking(radius_range=(1.0, 30.0))(np.zeros((1, 16, 16, 3), "float32"))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(radius=1.5, outer_radius=3.0),
        dict(radius_range=(1.0, 3.0)),
        dict(radius_range=(1.0, 3.0), outer_radius=3.5),
    ],
)
def test_serialization_round_trip_with_options(kwargs):
    layer = FrequencyMasking(p_low=0.4, seed=9, name="fm", **kwargs)
    config = layer.get_config()
    clone = check_layer_serialization(layer)
    assert clone.outer_radius == kwargs.get("outer_radius")
    assert clone.radius_range == (None if "radius_range" not in kwargs else tuple(kwargs["radius_range"]))
    images = np.random.default_rng(4).random((8, 9, 9, 3)).astype("float32")
    fresh = FrequencyMasking.from_config(config)
    np.testing.assert_array_equal(to_numpy(clone(images)[1]), to_numpy(fresh(images)[1]))
