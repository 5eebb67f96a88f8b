import keras
import numpy as np
import pytest

from keras_mfm import frequency
from keras_mfm.layers import FrequencyMasking
from tests import reference
from tests.conftest import to_numpy


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
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert isinstance(clone, FrequencyMasking)
    assert (clone.radius, clone.p_low, clone.seed, clone.name) == (2.5, 0.3, 7, "fm")


def test_bad_arguments():
    with pytest.raises(ValueError, match="p_low"):
        FrequencyMasking(p_low=1.5)
    with pytest.raises(ValueError, match="radius"):
        FrequencyMasking(radius=-1)
    with pytest.raises(ValueError, match="larger than the spectrum"):
        FrequencyMasking(radius=40)(np.zeros((1, 32, 32, 3), "float32"))
