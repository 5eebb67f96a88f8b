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
    mean = images.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(dc_only, np.broadcast_to(mean, images.shape), atol=1e-5)
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
    loss = float(to_numpy(frequency.frequency_loss(pred, target, high)))
    np.testing.assert_allclose(loss, (2.0 + 2e-6) / 3, rtol=1e-5)
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
        difference = reference.frequency_loss(up, target, mask) - reference.frequency_loss(down, target, mask)
        numeric = difference / (2 * eps)
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


# --- band masks (the authors' MASK_RADIUS1 = r1, MASK_RADIUS2 = r2) ---


def test_band_mask_hand_computed():
    # 9x9, centre (4, 4), r1 = 1.5, r2 = 3: the ring 2.25 <= d^2 < 9 is d^2 in {4, 5, 8}, i.e. the
    # 5x5 block around the centre without its 3x3 core (d^2 <= 2); (4, 7) at d^2 = 9 is outside.
    ring = np.zeros((9, 9))
    ring[2:7, 2:7] = 1
    ring[3:6, 3:6] = 0
    assert ring.sum() == 16
    band_pass = to_numpy(frequency.band_mask(9, 1.5, 3.0, low_pass=False))
    band_stop = to_numpy(frequency.band_mask(9, 1.5, 3.0, low_pass=True))
    assert band_pass.shape == (9, 9) and band_pass.dtype == np.float32
    np.testing.assert_array_equal(band_pass, ring)
    np.testing.assert_array_equal(band_stop, 1 - ring)
    assert band_pass[6, 6] == 1 and band_pass[4, 7] == 0 and band_pass[4, 4] == 0
    np.testing.assert_array_equal(reference.band_mask(9, 9, 1.5, 3.0, low_pass=False), ring)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("radii", [(0.5, 1.5), (1.0, 2.0), (1.5, 3.0), (2.3, 3.9)])
@pytest.mark.parametrize("low_pass", [True, False])
def test_band_mask_matches_reference(size, radii, low_pass):
    got = to_numpy(frequency.band_mask(size, *radii, low_pass=low_pass))
    np.testing.assert_array_equal(got, reference.band_mask(*size, *radii, low_pass))
    np.testing.assert_array_equal(frequency.band_mask_numpy(size, *radii, low_pass=low_pass), got)


@pytest.mark.parametrize("size", [(8, 8), (7, 10)])
@pytest.mark.parametrize("low_pass", [True, False])
def test_band_mask_without_band_is_circular(size, low_pass):
    circle = reference.circular_mask(*size, 2.0, low_pass)
    for outer in [None, frequency.max_radius(size) + 1e-3, 999.0, float("inf")]:
        np.testing.assert_array_equal(to_numpy(frequency.band_mask(size, 2.0, outer, low_pass)), circle)
    # r2 just at the farthest frequency still removes it from the ring (|k| < r2 is strict)
    at_edge = to_numpy(frequency.band_mask(size, 2.0, frequency.max_radius(size), low_pass))
    assert not np.array_equal(at_edge, circle)


@pytest.mark.parametrize("size", [(9, 9), (7, 10), (16, 16)])
def test_band_filter_matches_reference(size):
    rng = np.random.default_rng(size[1])
    images = rng.random((2, *size, 3))
    stop = reference.band_mask(*size, 1.5, 3.0, True)
    masks = np.stack([stop, 1 - stop])
    got = frequency.frequency_filter(
        images.astype("float32"),
        ops.stack([frequency.band_mask(size, 1.5, 3.0, True), frequency.band_mask(size, 1.5, 3.0, False)]),
    )
    np.testing.assert_allclose(to_numpy(got), reference.frequency_filter(images, masks), atol=1e-5)


@pytest.mark.parametrize("outer", [2.0, 1.0, 0.0, -3.0])
def test_outer_radius_not_larger_than_radius(outer):
    with pytest.raises(ValueError, match=r"`outer_radius`=.* must be larger than `radius`=2"):
        frequency.band_mask(16, 2.0, outer)


def test_bad_outer_radius_value():
    with pytest.raises(ValueError, match="outer_radius"):
        frequency.band_mask(16, 2.0, float("nan"))
    with pytest.raises(ValueError, match="larger than the spectrum"):  # r1 is still checked
        frequency.band_mask(16, 12.0, 999.0)


# --- focal spectrum weight matrix (focal frequency loss, Jiang et al. 2021) ---

FOCAL_OPTIONS = [
    dict(alpha=alpha, log=log, batch=batch) for alpha in (1.0, 2.0) for log in (False, True) for batch in (False, True)
]


@pytest.mark.parametrize("options", FOCAL_OPTIONS, ids=lambda o: "a{alpha:g}-log{log:d}-batch{batch:d}".format(**o))
def test_focal_weights_match_reference(options):
    rng = np.random.default_rng(11)
    pred = rng.normal(size=(3, 6, 7, 2))
    target = rng.normal(size=(3, 6, 7, 2))
    got = to_numpy(frequency.focal_weights(pred.astype("float32"), target.astype("float32"), **options))
    assert got.shape == (3, 2, 6, 7) and got.dtype == np.float32
    # un-shifted layout (like frequency_distance); the reference is fftshift-ed
    want = reference.focal_weights(pred, target, **options)
    np.testing.assert_allclose(np.fft.fftshift(got, axes=(-2, -1)), want, atol=1e-5)
    assert got.min() >= 0.0 and got.max() <= 1.0
    if options["batch"]:
        np.testing.assert_allclose(got.max(), 1.0, rtol=1e-6)
        assert np.all(got.max(axis=(2, 3)) < 1.0 + 1e-6)
    else:
        np.testing.assert_allclose(got.max(axis=(2, 3)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("options", FOCAL_OPTIONS, ids=lambda o: "a{alpha:g}-log{log:d}-batch{batch:d}".format(**o))
@pytest.mark.parametrize("masked", [True, False])
def test_focal_loss_matches_reference(options, masked):
    rng = np.random.default_rng(13)
    pred = rng.normal(size=(2, 8, 7, 3))
    target = rng.normal(size=(2, 8, 7, 3))
    low = reference.circular_mask(8, 7, 2.5, True)
    masks = np.stack([low, 1 - low]) if masked else None
    got = frequency.frequency_loss(
        pred.astype("float32"),
        target.astype("float32"),
        None if masks is None else masks.astype("float32"),
        focal=True,
        focal_alpha=options["alpha"],
        focal_log=options["log"],
        focal_batch=options["batch"],
    )
    want = reference.frequency_loss(pred, target, masks, focal=True, **options)
    np.testing.assert_allclose(float(to_numpy(got)), want, rtol=1e-5, atol=1e-7)
    # the weights are in [0, 1], so the focal loss is at most the plain one
    plain = reference.frequency_loss(pred, target, masks)
    assert want < plain


def test_focal_off_by_default():
    rng = np.random.default_rng(2)
    pred, target = rng.normal(size=(2, 2, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(
        float(to_numpy(frequency.frequency_loss(pred, target))),
        reference.frequency_loss(pred.astype("float64"), target.astype("float64")),
        rtol=1e-5,
    )


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("batch", [False, True])
def test_focal_loss_gradient_holds_weights_constant(masked, batch):
    rng = np.random.default_rng(17)
    pred = rng.normal(size=(2, 6, 6, 2)).astype("float32")
    target = rng.normal(size=(2, 6, 6, 2)).astype("float32")
    mask = frequency.circular_mask(6, 1.5, low_pass=False) if masked else None
    options = dict(focal=True, focal_alpha=2.0, focal_log=True, focal_batch=batch)
    # the weights at this pred, passed as constants
    weights = to_numpy(frequency.focal_weights(pred, target, alpha=2.0, log=True, batch=batch))
    scored = np.ones((6, 6), "float32") if mask is None else np.fft.ifftshift(1 - to_numpy(mask))
    denominator = float(scored.sum() * 2 * 2)  # frequencies x channels x images
    weights = ops.convert_to_tensor(weights * scored, "float32")

    def constant_weights_loss(p):
        distance = frequency.frequency_distance(p, target)
        return ops.sum(distance * weights) / denominator

    value, grad = value_and_grad(lambda p: frequency.frequency_loss(p, target, mask, **options), pred)
    want_value, want_grad = value_and_grad(constant_weights_loss, pred)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert np.abs(grad).max() > 1e-4
    # independent check: float64 finite differences of the NumPy loss with the reference weights held
    # fixed; letting the weights vary as well gives a different derivative.
    fixed = reference.focal_weights(pred.astype("float64"), target.astype("float64"), 2.0, True, batch)
    masks = None if mask is None else np.stack([to_numpy(mask)] * 2).astype("float64")

    def fixed_weights_loss(p):
        total = 0.0
        for b in range(2):
            for c in range(2):
                spectra = [np.fft.fftshift(np.fft.fft2(x[b, :, :, c], norm="ortho")) for x in (p, target)]
                d = np.sqrt(np.abs(spectra[0] - spectra[1]) ** 2 + 1e-12)
                total += np.sum(fixed[b, c] * d * (1.0 if masks is None else 1.0 - masks[b]))
        return total / denominator

    def focal(p):  # the weights move with p
        return reference.frequency_loss(p, target, masks, focal=True, alpha=2.0, log=True, batch=batch)

    eps = 1e-5
    indices = [(0, 0, 0, 0), (0, 2, 3, 1), (1, 5, 1, 0)]
    moving = []
    for index in indices:
        up, down = pred.astype("float64"), pred.astype("float64")
        up[index] += eps
        down[index] -= eps
        numeric = (fixed_weights_loss(up) - fixed_weights_loss(down)) / (2 * eps)
        np.testing.assert_allclose(grad[index], numeric, rtol=1e-3, atol=1e-6)
        moving.append((focal(up) - focal(down)) / (2 * eps))
    assert not np.allclose(moving, [grad[i] for i in indices], rtol=1e-2)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("masked", [True, False])
def test_focal_loss_pred_equals_target_is_finite(log, batch, masked):
    rng = np.random.default_rng(19)
    target = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    mask = frequency.circular_mask(6, 1.5, low_pass=False) if masked else None
    options = dict(focal=True, focal_log=log, focal_batch=batch)
    # everything equal: all weights 0/0 -> 0, loss 0
    weights = to_numpy(frequency.focal_weights(target, target, log=log, batch=batch))
    assert np.all(weights == 0)
    value, grad = value_and_grad(lambda p: frequency.frequency_loss(p, target, mask, **options), target)
    assert value == 0 and np.all(np.isfinite(grad))
    # one image equal, the other not: finite, and the differing image still gets a gradient
    pred = target.copy()
    pred[1] += rng.normal(size=pred[1].shape).astype("float32")
    weights = to_numpy(frequency.focal_weights(pred, target, log=log, batch=batch))
    assert np.all(np.isfinite(weights)) and np.all(weights[0] == 0)
    value, grad = value_and_grad(lambda p: frequency.frequency_loss(p, target, mask, **options), pred)
    assert np.isfinite(value) and value > 0 and np.all(np.isfinite(grad))
    assert np.abs(grad[1]).max() > 1e-4
