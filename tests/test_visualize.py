"""keras_mfm.visualize: the corruption figure renders and its pieces are right."""

import numpy as np
from PIL import Image

from keras_mfm import visualize
from tests.conftest import smooth_images


def test_grey_patches_paints_exactly_the_masked_patches():
    images = np.zeros((1, 8, 8, 3), "float32")
    painted = visualize.grey_patches(images, np.array([[0, 1, 0, 1]]), 4)  # patches 1 and 3 (top right, bottom right)
    assert np.all(painted[0, :, 4:] == visualize.GREY) and np.all(painted[0, :, :4] == 0)
    assert np.all(images == 0)  # the input is not modified


def test_log_spectrum_is_centred():
    images = np.full((1, 8, 8, 3), 0.5, "float32")  # constant: all energy at the zero frequency
    spectrum = visualize.log_spectrum(images)[0]
    assert spectrum[4, 4] == np.log1p(0.5 * 64) and np.count_nonzero(spectrum > 1e-9) == 1


def test_corruption_views_cover_every_corruption():
    views = visualize.corruption_views(smooth_images(2, 16), patch_size=4)
    assert list(views)[0] == "original" and len(views) == 8
    for title, view in views.items():
        assert view.shape == (2, 16, 16, 3) and view.min() >= 0 and view.max() <= 1, title
    masked = views["MAE mask (0.75)"][0]
    assert np.sum(np.all(masked.reshape(4, 4, 4, 4, 3).transpose(0, 2, 1, 3, 4) == visualize.GREY,
                         axis=(2, 3, 4))) == 12  # 12 of 16 patches grey


def test_corruption_figure_renders_a_non_blank_png(tmp_path):
    path = visualize.corruption_figure(smooth_images(2, 16), str(tmp_path / "figure.png"), patch_size=4, dpi=50)
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (int(1.7 * 4 * 50), int(1.6 * 8 * 50), 3)  # 2 rows per image, 8 views
    assert image.std() > 20  # not blank
