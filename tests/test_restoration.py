import os

import keras
import numpy as np
import pytest

from keras_mfm import backbones, frequency
from keras_mfm.layers import AdditiveNoise, Downsampling, GaussianBlur, RestorationCorruption
from keras_mfm.layers.restoration import RESTORATIONS
from keras_mfm.models import MFM
from tests.conftest import smooth_images, to_numpy
from tests.harness import check_layer_serialization


def uniform_images(n, size, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 3)).astype("float32")


def share_beyond_cutoff(images, factor):
    """Share of the orthonormal 2-D spectrum's energy at |k_y| > H / 2f or |k_x| > W / 2f."""
    height, width = images.shape[1:3]
    energy = np.abs(np.fft.fft2(images.astype(np.float64), axes=(1, 2), norm="ortho")) ** 2
    ky = np.abs(np.fft.fftfreq(height) * height)[:, None]
    kx = np.abs(np.fft.fftfreq(width) * width)[None, :]
    beyond = (ky > height / (2 * factor)) | (kx > width / (2 * factor))
    return energy[:, beyond].sum() / energy.sum()


def reference_kernel(sigma, size):
    offsets = np.arange(size) - size // 2
    kernel = np.exp(-(offsets**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def reference_blur(images, sigma, size):
    """NumPy separable blur, BORDER_REFLECT_101 (np.pad "reflect"), float64."""
    kernel = reference_kernel(sigma, size)
    radius = size // 2
    out = np.asarray(images, np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        length = out.shape[axis]
        out = sum(w * np.take(padded, np.arange(i, i + length), axis=axis) for i, w in enumerate(kernel))
    return out


# --- SR ------------------------------------------------------------------------------------------


def test_downsampling_removes_frequencies_beyond_the_cutoff():
    x = uniform_images(8, 64)
    corrupted, mask = Downsampling(factor=4)(x)
    out = to_numpy(corrupted)
    assert out.shape == x.shape and out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(to_numpy(mask), np.zeros((8, 64, 64), "float32"))
    # Measured share ratio (output / input, 0.232 for the input): 0.034 on TensorFlow and JAX,
    # 0.037 on PyTorch (bicubic a = -0.75); the identity gives 1.
    ratio = share_beyond_cutoff(out, 4) / share_beyond_cutoff(x, 4)
    assert ratio < 0.06, ratio
    # Deterministic.
    np.testing.assert_array_equal(to_numpy(Downsampling(factor=4)(x)[0]), out)


def test_downsampling_keeps_a_low_frequency_cosine():
    """2 cycles per 64 pixels, far below the cut-off (8 at factor 4): SR nearly keeps it."""
    cols = np.arange(64)
    x = np.broadcast_to((0.5 + 0.4 * np.cos(2 * np.pi * 2 * cols / 64))[None, None, :, None], (2, 64, 64, 3))
    out = to_numpy(Downsampling(factor=4)(x.astype("float32"))[0])
    # measured max |out - x|: 0.0131 (TF/JAX) and 0.0132 (PyTorch), at the borders; 0.0035 (TF/JAX)
    # and 0.0118 (PyTorch) at least 8 pixels away from them
    assert np.abs(out - x).max() < 0.03
    assert np.abs(out - x)[:, :, 8:-8].max() < 0.02


def test_downsampling_bad_factor():
    with pytest.raises(ValueError, match="factor`=3"):
        Downsampling(factor=3)(uniform_images(1, 32))
    with pytest.raises(ValueError, match="factor"):
        Downsampling(factor=1)
    with pytest.raises(ValueError, match="factor"):
        Downsampling(factor=2.5)
    assert Downsampling().factor == 8


# --- Deblur --------------------------------------------------------------------------------------


def test_blur_matches_numpy_reference_single_size():
    x = uniform_images(4, 32)
    out = to_numpy(GaussianBlur(sigma=1.5, kernel_sizes=(7,), seed=0)(x)[0])
    np.testing.assert_allclose(out, reference_blur(x, 1.5, 7), atol=2e-6)
    # The defaults at 32x32: sigma 5 * 32 / 224, kernel size 3.
    out = to_numpy(GaussianBlur(seed=0)(x)[0])
    np.testing.assert_allclose(out, reference_blur(x, 5 * 32 / 224, 3), atol=2e-6)
    # A kernel wider than the image still reflects correctly (np.pad reflects repeatedly).
    small = uniform_images(2, 8, seed=1)
    out = to_numpy(GaussianBlur(sigma=3.0, kernel_sizes=(21,), seed=0)(small)[0])
    np.testing.assert_allclose(out, reference_blur(small, 3.0, 21), atol=2e-6)


def test_blur_per_image_kernel_sizes():
    sizes = (3, 5, 7, 9)
    x = uniform_images(24, 32, seed=2)
    out = to_numpy(GaussianBlur(sigma=2.0, kernel_sizes=sizes, seed=4)(x)[0])
    references = np.stack([reference_blur(x, 2.0, k) for k in sizes])  # (4, B, H, W, C)
    errors = np.abs(references - out[None]).max(axis=(2, 3, 4))  # (4, B)
    assert np.all(errors.min(axis=0) < 2e-6), errors.min(axis=0)
    # each image matches exactly one size (the others differ by far more)
    assert np.all(np.sort(errors, axis=0)[1] > 1e-3)
    chosen = errors.argmin(axis=0)
    assert len(set(chosen.tolist())) >= 3, chosen  # uniform over 4 sizes, 24 images


def test_blur_attenuates_like_the_gaussian_transfer_function():
    sigma, size, n = 2.0, 13, 64
    x = uniform_images(16, n, seed=3)
    out = to_numpy(GaussianBlur(sigma=sigma, kernel_sizes=(size,), seed=0)(x)[0]).astype(np.float64)
    spectrum_in = np.fft.fft2(x - x.mean(axis=(1, 2), keepdims=True), axes=(1, 2))
    spectrum_out = np.fft.fft2(out - out.mean(axis=(1, 2), keepdims=True), axes=(1, 2))
    for ky, kx in [(2, 0), (4, 0), (0, 6), (4, 4)]:
        measured = np.sqrt(
            (np.abs(spectrum_out[:, ky, kx]) ** 2).sum() / (np.abs(spectrum_in[:, ky, kx]) ** 2).sum()
        )
        expected = np.exp(-2 * np.pi**2 * sigma**2 * (ky**2 + kx**2) / n**2)
        # measured / expected: 1.024, 1.005, 1.012, 1.018 (borders leak a little energy upwards)
        assert measured == pytest.approx(expected, rel=0.05), (ky, kx, measured, expected)
    high = np.abs(spectrum_out[:, 16:48, 16:48]).sum() / np.abs(spectrum_in[:, 16:48, 16:48]).sum()
    assert high < 0.05, high


def test_blur_default_parameters_scale_with_size():
    layer = GaussianBlur()
    assert layer.effective_parameters(224) == (5.0, (7, 9, 11, 13, 15, 17, 19, 21))
    sigma, sizes = layer.effective_parameters((32, 32))
    assert sigma == pytest.approx(5 * 32 / 224) and sizes == (3,)
    sigma, sizes = layer.effective_parameters((64, 96))
    assert sigma == pytest.approx(5 * 64 / 224) and sizes == (3, 5, 7)  # 2 -> 3 and 6 -> 7 (halves up)
    assert GaussianBlur(sigma=1.0, kernel_sizes=(5, 3)).effective_parameters(32) == (1.0, (3, 5))


def test_blur_bad_arguments():
    for sigma in (0, -1.0):
        with pytest.raises(ValueError, match="sigma"):
            GaussianBlur(sigma=sigma)
    with pytest.raises(ValueError, match="odd"):
        GaussianBlur(kernel_sizes=(3, 4))
    with pytest.raises(ValueError, match="odd"):
        GaussianBlur(kernel_sizes=(-1,))
    with pytest.raises(ValueError, match="empty"):
        GaussianBlur(kernel_sizes=())


# --- Denoise -------------------------------------------------------------------------------------


def test_noise_statistics_and_no_clip():
    x = uniform_images(64, 32)
    sigma = 75 / 255
    out = to_numpy(AdditiveNoise(seed=0)(x)[0])
    noise = out - x
    # 196,608 samples: the mean's standard error is 0.00066, the std's relative error 0.0016
    assert abs(noise.mean()) < 0.005
    assert noise.std() == pytest.approx(sigma, rel=0.02)
    assert out.min() < 0.0 and out.max() > 1.0  # not clipped by default
    clipped = to_numpy(AdditiveNoise(sigma=sigma, clip=True, seed=0)(x)[0])
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0
    np.testing.assert_allclose(clipped, np.clip(out, 0, 1), atol=1e-6)  # same seed, same noise


def test_noise_bad_sigma():
    for sigma in (0.0, -0.1):
        with pytest.raises(ValueError, match="sigma"):
            AdditiveNoise(sigma=sigma)


# --- All -----------------------------------------------------------------------------------------

LAYERS = {
    "sr": lambda seed=None: Downsampling(factor=4, name="sr"),
    "deblur": lambda seed=None: GaussianBlur(sigma=1.0, kernel_sizes=(3, 5), seed=seed, name="deblur"),
    "denoise": lambda seed=None: AdditiveNoise(sigma=0.2, clip=True, seed=seed, name="denoise"),
}


def test_registry():
    assert RESTORATIONS == {"sr": Downsampling, "deblur": GaussianBlur, "denoise": AdditiveNoise}
    assert all(issubclass(cls, RestorationCorruption) for cls in RESTORATIONS.values())


@pytest.mark.parametrize("name", ["deblur", "denoise"])
def test_seeded_and_random_across_calls(name):
    x = uniform_images(16, 16)
    first = to_numpy(LAYERS[name](seed=5)(x)[0])
    np.testing.assert_array_equal(first, to_numpy(LAYERS[name](seed=5)(x)[0]))
    assert not np.array_equal(first, to_numpy(LAYERS[name](seed=6)(x)[0]))
    layer = LAYERS[name](seed=5)
    assert not np.array_equal(to_numpy(layer(x)[0]), to_numpy(layer(x)[0]))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_outputs_and_serialization(name):
    layer = LAYERS[name](seed=3)
    x = uniform_images(2, 16)
    corrupted, mask = layer(x)
    assert tuple(corrupted.shape) == (2, 16, 16, 3) and tuple(mask.shape) == (2, 16, 16)
    assert keras.backend.standardize_dtype(mask.dtype) == "float32"
    assert not np.any(to_numpy(mask))
    assert layer.compute_output_shape((None, 16, 16, 3)) == ((None, 16, 16, 3), (None, 16, 16))
    check_layer_serialization(layer)


def test_zero_kept_mask_scores_the_full_spectrum():
    pred, target = uniform_images(2, 16, seed=1), uniform_images(2, 16, seed=2)
    mask = to_numpy(GaussianBlur(seed=0)(target)[1])
    np.testing.assert_allclose(
        to_numpy(frequency.frequency_loss(pred, target, mask)),
        to_numpy(frequency.frequency_loss(pred, target)),
        rtol=1e-6,
    )


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_mfm_fit_and_save_load(name, tmp_path):
    keras.utils.set_random_seed(0)
    encoder = backbones.ViTBackbone(image_size=16, patch_size=4, hidden_dim=32, depth=1, num_heads=2)
    model = MFM(encoder, corruption=LAYERS[name](seed=1))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = smooth_images(8, 16)
    losses = model.fit(x, batch_size=4, epochs=1, verbose=0).history["loss"]  # 2 steps
    assert len(losses) == 1 and np.all(np.isfinite(losses)), losses
    path = os.path.join(tmp_path, "mfm.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, MFM) and type(loaded.corruption) is type(model.corruption)
    assert loaded.corruption.get_config() == model.corruption.get_config()
    saved, restored = model.get_weights(), loaded.get_weights()
    assert len(saved) == len(restored) > 0
    for a, b in zip(saved, restored):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_bad_input_shapes(name):
    with pytest.raises(ValueError, match="NHWC"):
        LAYERS[name]()(np.zeros((2, 16, 16), "float32"))
    with pytest.raises(ValueError, match="static height and width"):
        LAYERS[name]().build((None, None, None, 3))
    with pytest.raises(ValueError, match="static height and width"):
        LAYERS[name]()(keras.Input((16, None, 3)))
