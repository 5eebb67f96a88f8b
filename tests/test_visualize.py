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


# -- reconstruction_figure / history_figure -----------------------------------------------------
import io  # noqa: E402

import keras  # noqa: E402
import pytest  # noqa: E402
from keras import ops  # noqa: E402

from keras_mfm import backbones, methods  # noqa: E402
from keras_mfm.importance import ImportanceScorer  # noqa: E402
from keras_mfm.masking import MASKED, THROWN, VISIBLE  # noqa: E402
from keras_mfm.models.mae import patchify  # noqa: E402
from tests.conftest import to_numpy  # noqa: E402

DPI = 40  # with PANEL_WIDTH 1.5, PANEL_HEIGHT 1.75 and TITLE_HEIGHT 0.25 every size is a whole pixel count
DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)
COLUMNS = {"mfm": 6, "sr": 6, "mae": 4, "famt": 5, "simmim": 4}  # famt adds the importance map


def tiny_model(method, **options):
    keras.utils.set_random_seed(0)
    encoder = backbones.ViTBackbone(image_size=16, patch_size=4, hidden_dim=32, depth=1, num_heads=2)
    if method in ("mae", "amt", "famt"):
        options = {**DECODER, **options}
    if method in ("amt", "famt", "simmim_famt"):
        options.setdefault("num_images", 4)
    model = methods.build_method(method, encoder, **options)
    model.build((None, 16, 16, 3))
    if getattr(model, "importance", None):
        model.set_importance(np.random.default_rng(0).uniform(0.1, 1.0, (4, 16)).astype("float32"))
    return model


def seed_states(model):
    return [to_numpy(v).copy() for v in model.variables if v.name == "seed_generator_state"]


def png_pixels(target):
    return np.asarray(Image.open(target).convert("RGB"))


@pytest.mark.parametrize("method", list(COLUMNS))
def test_reconstruction_figure_renders_every_kind_of_model(method, tmp_path):
    model = tiny_model(method)
    before = seed_states(model)
    path = visualize.reconstruction_figure(model, smooth_images(2, 16), str(tmp_path / "r.png"), dpi=DPI)
    image = png_pixels(path)
    height = (visualize.PANEL_HEIGHT * 2 + visualize.TITLE_HEIGHT) * DPI
    assert image.shape == (int(height), int(visualize.PANEL_WIDTH * COLUMNS[method] * DPI), 3)
    assert image.std() > 20  # not blank
    after = seed_states(model)  # drawing the figure leaves the model's random stream where it was
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(after, before))


def test_reconstruction_figure_is_reproducible_and_writes_to_a_file_object():
    model, images = tiny_model("mae"), smooth_images(2, 16)
    first, second, other = io.BytesIO(), io.BytesIO(), io.BytesIO()
    for target, seed in ((first, 0), (second, 0), (other, 1)):
        assert visualize.reconstruction_figure(model, images, target, seed=seed, dpi=DPI) is target
        target.seek(0)
    assert np.array_equal(png_pixels(first), png_pixels(second))
    assert not np.array_equal(png_pixels(first), png_pixels(other))  # another seed, other masks


def test_compose_reconstruction_by_hand():
    images = np.random.default_rng(0).random((1, 8, 8, 3)).astype("float32")
    labels = np.array([[VISIBLE, MASKED, THROWN, VISIBLE]])  # top left, top right, bottom left, bottom right
    predicted = np.full((1, 4, 48), 0.25, "float32")
    out = visualize.compose_reconstruction(images, labels, predicted, 4)
    assert out.shape == (1, 8, 8, 3)
    np.testing.assert_array_equal(out[0, :4, :4], images[0, :4, :4])  # visible: the input
    np.testing.assert_array_equal(out[0, 4:, 4:], images[0, 4:, 4:])
    assert np.all(out[0, :4, 4:] == 0.25)  # masked: the prediction
    assert np.all(out[0, 4:, :4] == 0.0)  # thrown: black
    np.testing.assert_array_equal(visualize.patchify_numpy(images, 4), to_numpy(patchify(images, 4)))


@pytest.mark.parametrize("method,options", [("mae", {"norm_pix_loss": True}), ("mae", {}), ("simmim", {})])
def test_a_perfect_prediction_reconstructs_the_image(method, options, monkeypatch):
    """Un-normalising (and, with norm_pix_loss, re-scaling by the true patches) inverts the target."""
    model, images = tiny_model(method, **options), smooth_images(2, 16)
    target = model.target if method == "mae" else \
        (lambda x: patchify(model.encoder.normalize(x), model.encoder.patch_size))

    def perfect(images, draw, training=None):
        return ops.take_along_axis(target(images), ops.cast(draw.masked, "int32")[:, :, None], axis=1)

    monkeypatch.setattr(model, "predict_masked", perfect)
    views = visualize.token_reconstruction(model, images)
    labels = views["labels"]
    assert views["importance"] is None and not np.any(labels == THROWN)
    assert np.sum(labels == MASKED) == 2 * 12  # MAE: 0.75 of 16 patches; SimMIM: ceil(0.6 x 4) units of 4
    np.testing.assert_allclose(views["reconstruction"], images, atol=2e-5)
    masked = np.repeat(np.repeat((labels == MASKED).reshape(2, 4, 4), 4, axis=1), 4, axis=2)
    assert np.all(views["tokens"][masked] == visualize.GREY)
    np.testing.assert_allclose(views["prediction"][masked], images[masked], atol=2e-5)
    assert np.all(views["prediction"][~masked] == visualize.BACKGROUND)


def test_famt_views_follow_the_importance_of_these_images():
    model, images = tiny_model("famt"), smooth_images(2, 16)
    with visualize.seeded_draws(model, 0):
        views = visualize.token_reconstruction(model, images)
    expected = to_numpy(ImportanceScorer(model.encoder, "famt")(images))
    np.testing.assert_allclose(views["importance"], expected, rtol=1e-5, atol=1e-7)
    labels = views["labels"]
    assert np.all(np.sum(labels == MASKED, axis=1) == 7) and np.all(np.sum(labels == THROWN, axis=1) == 6)
    thrown = np.repeat(np.repeat((labels == THROWN).reshape(2, 4, 4), 4, axis=1), 4, axis=2)
    assert np.all(views["tokens"][thrown] == 0) and np.all(views["reconstruction"][thrown] == 0)
    # a given importance map drives the draw: all weight on four patches -> those are the masked ones
    weights = np.full((2, 16), 1e-6, "float32")
    weights[:, [0, 5, 10, 15]] = 1.0
    views = visualize.token_reconstruction(model, images, importance=weights)
    assert np.all(views["labels"][:, [0, 5, 10, 15]] == MASKED)
    with pytest.raises(ValueError, match="importance map of shape"):
        visualize.token_reconstruction(model, images, importance=weights[:, :8])
    with pytest.raises(ValueError, match="no patches by importance"):
        visualize.token_reconstruction(tiny_model("simmim"), images, importance=weights)


@pytest.mark.parametrize("method", ["mfm", "sr", "mae", "famt", "simmim", "simmim_famt"])
def test_every_pretraining_model_reconstructs_what_a_figure_needs(method):
    """`model.reconstruct(images)`: the model's own view of its outputs, which the figures only draw."""
    model, images = tiny_model(method), smooth_images(2, 16)
    out = {key: None if value is None else to_numpy(value) for key, value in model.reconstruct(images).items()}
    if method in ("mfm", "sr"):
        assert set(out) == {"corrupted", "kept_mask", "prediction"}
        assert out["corrupted"].shape == out["prediction"].shape == (2, 16, 16, 3)
        assert out["kept_mask"].shape == (2, 16, 16)
        tokens = model.encoder(out["corrupted"])  # the prediction is the head's, un-normalised
        head = to_numpy(model.head(model.encoder.feature_map(tokens)))
        np.testing.assert_allclose(out["prediction"], head * np.array(model.encoder.std) + np.array(model.encoder.mean),
                                   rtol=1e-5, atol=1e-5)
        return
    assert set(out) == {"importance", "labels", "masked", "prediction"}
    masked = out["masked"]
    assert out["labels"].shape == (2, 16) and out["prediction"].shape == (2, masked.shape[1], 48)
    assert np.all(np.take_along_axis(out["labels"], masked, axis=1) == MASKED)
    assert (out["importance"] is None) == (method in ("mae", "simmim"))


def test_frequency_views_of_mfm_and_a_restoration_baseline():
    images = smooth_images(2, 16)
    views = visualize.frequency_reconstruction(tiny_model("mfm"), images)
    prediction = views["prediction"]
    assert prediction.shape == images.shape and 0 <= prediction.min() <= prediction.max() <= 1
    assert set(np.unique(views["kept_mask"])) == {0.0, 1.0}  # some frequencies kept, some masked
    views = visualize.frequency_reconstruction(tiny_model("sr"), images)
    assert np.all(views["kept_mask"] == 0)  # restoration: nothing kept, no overlay


def test_reconstruction_figure_rejects_encoders_and_wrong_images(tmp_path):
    encoder = backbones.ViTBackbone(image_size=16, patch_size=4, hidden_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"not a keras_mfm pre-training model \(MFM, MAE, SimMIM\)"):
        visualize.reconstruction_figure(encoder, smooth_images(1, 16), str(tmp_path / "r.png"))
    with pytest.raises(ValueError, match="takes 16x16 images, got 8x8"):
        visualize.reconstruction_figure(tiny_model("mfm"), smooth_images(1, 8), str(tmp_path / "r.png"))
    assert not (tmp_path / "r.png").exists()


def write_history(path, rows, columns=("epoch", "epoch_seconds", "images_per_second", "loss", "lr")):
    with open(path, "w") as handle:
        handle.write(",".join(columns) + "\n")
        for row in rows:
            handle.write(",".join(str(v) for v in row) + "\n")
    return str(path)


def test_history_figure(tmp_path):
    rows = [(0, 1.2, 100.0, 2.0, 1e-4), (1, 1.0, 120.0, 1.4, 2e-4), (2, 1.0, 121.0, 1.1, 1.5e-4)]
    path = visualize.history_figure(write_history(tmp_path / "history.csv", rows), str(tmp_path / "h.png"), dpi=50)
    image = png_pixels(path)
    assert image.shape == (160, 450, 3) and image.std() > 5  # two panels of 4.5 x 3.2 inches
    history = visualize.read_history(str(tmp_path / "history.csv"))
    np.testing.assert_array_equal(history["loss"], [2.0, 1.4, 1.1])
    # without images/s: the loss (and lr) panel only
    lean = write_history(tmp_path / "lean.csv", [(0, 0.5), (1, 0.4)], columns=("epoch", "loss"))
    assert png_pixels(visualize.history_figure(lean, str(tmp_path / "l.png"), dpi=50)).shape == (160, 225, 3)


def test_history_figure_errors(tmp_path):
    with pytest.raises(ValueError, match="No history file at"):
        visualize.history_figure(str(tmp_path / "missing.csv"), str(tmp_path / "h.png"))
    with pytest.raises(ValueError, match="holds no epochs"):
        visualize.history_figure(write_history(tmp_path / "empty.csv", []), str(tmp_path / "h.png"))
    with pytest.raises(ValueError, match="no 'loss' column"):
        visualize.history_figure(write_history(tmp_path / "x.csv", [(0, 1)], ("epoch", "acc")), str(tmp_path / "h.png"))
    assert not (tmp_path / "h.png").exists()
