"""Figures of what the encoder sees: images, their spectra and each pre-training corruption.

`corruption_views(images)` applies every corruption of the registry's objectives to a batch
(low-/high-pass frequency masks, SR, deblur, denoise, and the token masks of MAE and SimMIM drawn
as grey patches); `corruption_figure(images, path)` lays them out with matplotlib, one image per
pair of rows: the pictures, then their centred log-magnitude spectra `log(1 + |fftshift(fft2(x))|)`
(mean over the channels). Colour maps and the spectrum scale are shared along a row, so the kept and
removed frequencies compare at a glance.

`reconstruction_figure(model, images, path)` draws what a pre-training model makes of a few images,
as the model itself reports it (`model.reconstruct(images)`; MFM and the restoration baselines: the
image, the corrupted input and the prediction with their spectra; MAE/AMT/FAMT and SimMIM: the
importance map, the visible/masked/thrown tokens and the reconstruction); `history_figure(history_csv,
path)` plots a run's `history.csv`. Both are what `eval.py show` writes and
`keras_mfm.tensorboard.ReconstructionImages` logs.
"""

import csv
import math
import os

import numpy as np
from keras import ops

from keras_mfm import frequency
from keras_mfm.layers.frequency_masking import FrequencyMasking
from keras_mfm.layers.restoration import AdditiveNoise, Downsampling, GaussianBlur
from keras_mfm.masking import MASKED, THROWN, VISIBLE, select_tokens
from keras_mfm.models import MFM, TokenMaskingModel
from keras_mfm.layers.patches import patchify, unpatchify

GREY = 0.5  # fill colour of a masked patch
THROWN_FILL = 0.0  # fill colour of a thrown patch (black)
BACKGROUND = 1.0  # where a prediction-only view has no prediction (white)
MASKED_OVERLAY = (0.0, 0.85, 1.0, 0.55)  # RGBA drawn over the masked frequencies of a spectrum
PANEL_WIDTH, PANEL_HEIGHT = 1.5, 1.75  # inches per image panel (and its title)
TITLE_HEIGHT = 0.25  # inches above the panels of `reconstruction_figure` for its heading


def pyplot():
    """`matplotlib.pyplot` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path, dpi):
    """Saves `figure` as PNG to a path or a binary file object and closes it; returns `path`."""
    figure.savefig(path, dpi=dpi, format="png")
    pyplot().close(figure)
    return path


def _clear_ticks(axes):
    for axis in np.ravel(axes):
        axis.set_xticks([])
        axis.set_yticks([])


def log_spectrum(images):
    """`(B, H, W, C)` in [0, 1] -> `(B, H, W)` centred `log(1 + |F|)`, F the un-normalised 2-D FFT,
    averaged over the channels (NumPy)."""
    images = np.asarray(images, dtype="float64")
    spectrum = np.fft.fftshift(np.fft.fft2(images, axes=(1, 2)), axes=(1, 2))
    return np.log1p(np.abs(spectrum)).mean(axis=-1)


def grey_patches(images, patch_mask, patch_size):
    """Images with the patches where `patch_mask` `(B, N)` is 1 painted grey (row-major patches)."""
    images = np.asarray(images, dtype="float32")
    grid = (images.shape[1] // patch_size, images.shape[2] // patch_size)
    labels = np.where(np.asarray(patch_mask) > 0, MASKED, VISIBLE)
    return _compose(labels, patchify_numpy(images, patch_size), GREY, GREY, patch_size, grid)


def corruption_views(images, patch_size=4, radius=None, seed=0):
    """`{title: (B, H, W, 3) NumPy images}` of every corruption, the original first.

    Args:
        images: `(B, H, W, 3)` in [0, 1].
        patch_size: ViT patch of the token masks (MAE 0.75 random patches; SimMIM 0.6 of the
            units of twice the patch size).
        radius: MFM radius (None: the authors' 16 at 224, scaled).
    """
    images = np.asarray(images, dtype="float32")
    batch, height, width, _ = images.shape
    views = {"original": images}
    low, _ = FrequencyMasking(radius=radius, p_low=1.0, seed=seed)(images)
    high, _ = FrequencyMasking(radius=radius, p_low=0.0, seed=seed)(images)
    r = radius if radius is not None else frequency.default_radius((height, width))
    views[f"low-pass (r={r:.1f})"] = low
    views["high-pass"] = high
    views["sr (x8)" if height % 8 == 0 else "sr (x2)"] = Downsampling(8 if height % 8 == 0 else 2)(images)[0]
    views["deblur"] = GaussianBlur(seed=seed)(images)[0]
    views["denoise"] = AdditiveNoise(clip=True, seed=seed)(images)[0]  # clipped for display only
    num_patches = (height // patch_size) * (width // patch_size)
    mae = select_tokens(np.ones((batch, num_patches), "float32"), 0.75, seed=seed)
    views["MAE mask (0.75)"] = grey_patches(images, ops.convert_to_numpy(mae.labels) == 1, patch_size)
    unit = 2 * patch_size
    if height % unit == 0 and width % unit == 0:
        units = (height // unit) * (width // unit)
        unit_selection = select_tokens(np.ones((batch, units), "float32"), 0.6, seed=seed)
        unit_mask = (ops.convert_to_numpy(unit_selection.labels) == 1).reshape(batch, height // unit, 1,
                                                                               width // unit, 1)
        patch_mask = np.broadcast_to(unit_mask, (batch, height // unit, 2, width // unit, 2)).reshape(batch, -1)
        views["SimMIM mask (0.6)"] = grey_patches(images, patch_mask, patch_size)
    return {title: np.clip(np.asarray(ops.convert_to_numpy(view)), 0.0, 1.0) for title, view in views.items()}


def corruption_figure(images, path, patch_size=4, radius=None, seed=0, dpi=100):
    """Saves the figure of `corruption_views(images)` to `path` (PNG); returns the path."""
    plt = pyplot()
    views = corruption_views(images, patch_size, radius, seed)
    titles = list(views)
    rows = 2 * len(images)
    figure, axes = plt.subplots(rows, len(titles), figsize=(1.6 * len(titles), 1.7 * rows), squeeze=False)
    for b in range(len(images)):
        spectra = [log_spectrum(views[title][b:b + 1])[0] for title in titles]
        top = max(float(s.max()) for s in spectra)
        for column, title in enumerate(titles):
            axes[2 * b, column].imshow(views[title][b], interpolation="nearest")
            axes[2 * b + 1, column].imshow(spectra[column], cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
            if b == 0:
                axes[0, column].set_title(title, fontsize=8)
        axes[2 * b, 0].set_ylabel("image", fontsize=8)
        axes[2 * b + 1, 0].set_ylabel("log |F|", fontsize=8)
    _clear_ticks(axes)
    figure.tight_layout()
    return _save(figure, path, dpi)


# -- what a pre-training model makes of a few images ---------------------------------------------
def check_pretraining_model(model, source=None):
    """`model` if it is an MFM/restoration or token-masking (MAE, AMT/FAMT, SimMIM) model, else
    a ValueError saying what was passed instead (`source`: the file it came from)."""
    if isinstance(model, (MFM, TokenMaskingModel)):
        return model
    what = f"{source} holds a {type(model).__name__}" if source else \
        f"{type(model).__name__} {getattr(model, 'name', '')!r}"
    raise ValueError(
        f"{what}, which is not a keras_mfm pre-training model (MFM, MAE, SimMIM): pass the whole "
        "pre-training model (a run's checkpoint.keras), not its encoder or a classifier."
    )


class seeded_draws:
    """Context manager: every `keras.random.SeedGenerator` of `model` starts from `[seed, 0]`
    inside, and gets its state back on exit, so a figure's masks follow `seed` and drawing them
    (e.g. from a callback during `fit`) does not shift the training run's random stream."""

    def __init__(self, model, seed=0):
        self.seed = int(seed)
        seen = set()
        self.states = []
        for variable in model.variables:
            if variable.name == "seed_generator_state" and id(variable) not in seen:
                seen.add(id(variable))
                self.states.append(variable)

    def __enter__(self):
        self.saved = [np.array(ops.convert_to_numpy(v)) for v in self.states]
        for variable, saved in zip(self.states, self.saved):
            variable.assign(np.array([self.seed, 0]).astype(saved.dtype))
        return self

    def __exit__(self, *exc):
        for variable, saved in zip(self.states, self.saved):
            variable.assign(saved)
        return False


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float32")


def _check_images(model, images):
    images = np.asarray(images, dtype="float32")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"Expected images of shape (B, H, W, 3), got {images.shape}.")
    height, width = model.encoder.image_size
    if images.shape[1:3] != (height, width):
        raise ValueError(
            f"The model takes {height}x{width} images, got {images.shape[1]}x{images.shape[2]}."
        )
    return images


def patchify_numpy(images, patch_size):
    """`layers.patches.patchify` as a NumPy array: `(B, H, W, C) -> (B, N, p * p * C)`, row-major patches."""
    return _numpy(patchify(np.asarray(images, dtype="float32"), patch_size))


def unpatchify_numpy(patches, patch_size, grid_size, channels=3):
    """`layers.patches.unpatchify` as a NumPy array: `(B, N, p * p * C) -> (B, H, W, C)`."""
    return _numpy(unpatchify(np.asarray(patches, dtype="float32"), patch_size, grid_size, channels))


def _compose(labels, visible, masked, thrown, patch_size, grid_size):
    """Patches by label (each broadcastable to `(B, N, p * p * 3)`) -> `(B, H, W, 3)` images."""
    labels = np.asarray(labels)[:, :, None]
    patches = np.where(labels == VISIBLE, visible, np.where(labels == MASKED, masked, thrown))
    shape = (labels.shape[0], labels.shape[1], patch_size * patch_size * 3)
    return unpatchify_numpy(np.broadcast_to(patches, shape).astype("float32"), patch_size, grid_size)


def compose_reconstruction(images, labels, predicted_patches, patch_size):
    """MAE's reconstruction figure: the visible patches of `images`, the masked ones from
    `predicted_patches`, the thrown ones black.

    Args:
        images: `(B, H, W, 3)`.
        labels: `(B, N)` `masking.VISIBLE` / `MASKED` / `THROWN` of the row-major patches.
        predicted_patches: `(B, N, p * p * 3)` pixels of every patch position (`patchify` layout;
            only the masked positions are read).
        patch_size: `p`.
    """
    images = np.asarray(images, dtype="float32")
    grid = (images.shape[1] // patch_size, images.shape[2] // patch_size)
    return _compose(labels, patchify_numpy(images, patch_size), np.asarray(predicted_patches, "float32"),
                    THROWN_FILL, patch_size, grid)


def frequency_reconstruction(model, images):
    """`model.reconstruct(images)` of an MFM (or restoration) model as NumPy, all `(B, H, W, ...)`:
    `{"corrupted", "kept_mask", "prediction"}`, the images clipped to [0, 1] for display."""
    views = {key: _numpy(value) for key, value in model.reconstruct(_check_images(model, images)).items()}
    views["corrupted"] = np.clip(views["corrupted"], 0.0, 1.0)
    views["prediction"] = np.clip(views["prediction"], 0.0, 1.0)
    return views


def token_reconstruction(model, images, importance=None):
    """`model.reconstruct(images, importance)` of an MAE/AMT/FAMT or SimMIM model laid out as images
    (NumPy): `{"importance": (B, N) or None, "labels": (B, N), "predicted_patches": (B, N, p*p*3)
    pixels (zeros where nothing was predicted), "tokens", "reconstruction", "prediction"}`.
    `importance`: the weights of the draw (None: an AMT/FAMT model scores these images)."""
    images = _check_images(model, images)
    p, grid = model.encoder.patch_size, tuple(model.encoder.grid_size)
    out = model.reconstruct(images, None if importance is None else _numpy(importance))
    labels = np.asarray(ops.convert_to_numpy(out["labels"])).astype("int32")
    masked = np.asarray(ops.convert_to_numpy(out["masked"])).astype("int64")
    predicted = np.zeros((len(images), model.encoder.num_patches, p * p * 3), "float32")
    np.put_along_axis(predicted, masked[:, :, None], np.clip(_numpy(out["prediction"]), 0.0, 1.0), axis=1)
    original = patchify_numpy(images, p)
    return {
        "importance": None if out["importance"] is None else _numpy(out["importance"]),
        "labels": labels,
        "predicted_patches": predicted,
        "tokens": _compose(labels, original, GREY, THROWN_FILL, p, grid),
        "reconstruction": compose_reconstruction(images, labels, predicted, p),
        "prediction": _compose(labels, BACKGROUND, predicted, BACKGROUND, p, grid),
    }


def _figure(rows, columns, heading):
    plt = pyplot()
    width, height = PANEL_WIDTH * columns, PANEL_HEIGHT * rows + TITLE_HEIGHT
    figure, axes = plt.subplots(rows, columns, figsize=(width, height), squeeze=False)
    figure.suptitle(heading, fontsize=9, y=1 - 0.5 * TITLE_HEIGHT / height, va="center")  # in the reserved band
    return figure, axes


def _finish(figure, axes, titles, path, dpi):
    for column, title in enumerate(titles):
        axes[0, column].set_title(title, fontsize=8)
    _clear_ticks(axes)
    height = figure.get_figheight()
    figure.tight_layout(rect=(0, 0, 1, 1 - TITLE_HEIGHT / height), pad=0.4)
    return _save(figure, path, dpi)


def _frequency_figure(model, images, path, dpi):
    views = frequency_reconstruction(model, images)
    frequency_mask = bool(np.any(views["kept_mask"] > 0))
    titles = ["original", "spectrum, masked (cyan)" if frequency_mask else "spectrum", "corrupted input",
              "input spectrum", "prediction", "prediction spectrum"]
    corruption = "frequency masking" if isinstance(model.corruption, FrequencyMasking) else \
        type(model.corruption).__name__
    figure, axes = _figure(len(images), len(titles), f"{model.name} ({type(model).__name__}, {corruption})")
    for b in range(len(images)):
        pictures = [images[b], views["corrupted"][b], views["prediction"][b]]
        spectra = [log_spectrum(picture[None])[0] for picture in pictures]
        top = max(float(s.max()) for s in spectra)
        for i, (picture, spectrum) in enumerate(zip(pictures, spectra)):
            axes[b, 2 * i].imshow(picture, interpolation="nearest")
            axes[b, 2 * i + 1].imshow(spectrum, cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
        kept = views["kept_mask"][b]
        if np.any(kept > 0):
            overlay = np.zeros(kept.shape + (4,), "float32")
            overlay[kept <= 0] = MASKED_OVERLAY
            axes[b, 1].imshow(overlay, interpolation="nearest")
    return _finish(figure, axes, titles, path, dpi)


def _token_figure(model, images, path, importance, dpi):
    views = token_reconstruction(model, images, importance)
    labels = views["labels"][0]
    masked, thrown = int(np.sum(labels == MASKED)), int(np.sum(labels == THROWN))
    columns = ["original"] + (["importance"] if views["importance"] is not None else []) + \
        [f"tokens ({masked} masked, {thrown} thrown)", "reconstruction", "prediction"]
    source = f"{model.importance} importance" if model.importance else \
        ("given importance" if views["importance"] is not None else "random masking")
    heading = f"{model.name} ({type(model).__name__}, {source}): masked grey, thrown black"
    figure, axes = _figure(len(images), len(columns), heading)
    rows, cols = model.encoder.grid_size
    for b in range(len(images)):
        column = 0
        axes[b, column].imshow(images[b], interpolation="nearest")
        if views["importance"] is not None:
            column += 1
            axes[b, column].imshow(views["importance"][b].reshape(rows, cols), cmap="viridis",
                                   interpolation="nearest")
        for name in ("tokens", "reconstruction", "prediction"):
            column += 1
            axes[b, column].imshow(np.clip(views[name][b], 0.0, 1.0), interpolation="nearest")
    return _finish(figure, axes, columns, path, dpi)


def reconstruction_figure(model, images, path, importance=None, seed=0, dpi=100):
    """Saves what pre-training `model` makes of `images` `(B, H, W, 3)` in [0, 1] as a PNG.

    One row per image. MFM and the restoration baselines: the original and its log spectrum (the
    masked frequencies in cyan), the corrupted input and its spectrum, the prediction (un-normalised,
    clipped to [0, 1]) and its spectrum. MAE/AMT/FAMT and SimMIM: the original, the importance map
    on the patch grid (models with `importance`, or a given `importance` `(B, N)`), the tokens
    (visible as they are, masked grey, thrown black), the reconstruction (visible patches from the
    original, masked ones predicted, thrown black) and the prediction alone (white elsewhere).

    The random draws (masks, restoration noise) start from `seed` and leave the model's random
    state as it was. `path`: a file name or a binary file object. Returns `path`.
    Figure size: `PANEL_WIDTH * columns` x `PANEL_HEIGHT * B + TITLE_HEIGHT` inches at `dpi`.
    """
    check_pretraining_model(model)
    images = _check_images(model, images)
    with seeded_draws(model, seed):
        if isinstance(model, MFM):
            return _frequency_figure(model, images, path, dpi)
        return _token_figure(model, images, path, importance, dpi)


# -- a run's training curves ----------------------------------------------------------------------
def read_history(history_csv):
    """`{column: float array}` of a run's `history.csv` (ValueError if missing, empty or lossless)."""
    if not os.path.isfile(history_csv):
        raise ValueError(f"No history file at {history_csv}.")
    with open(history_csv, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if any((value or "").strip() for value in row.values())]
    if not rows:
        raise ValueError(f"{history_csv} holds no epochs (empty history: has the run finished an epoch?).")
    if "loss" not in rows[0]:
        raise ValueError(f"{history_csv} has no 'loss' column (columns: {', '.join(rows[0])}).")

    def number(text):
        try:
            return float(text)
        except (TypeError, ValueError):
            return math.nan

    return {column: np.array([number(row.get(column)) for row in rows]) for column in rows[0]}


def history_figure(history_csv, path, dpi=100):
    """Saves the training curves of a run's `history.csv` (as `training.pretrain` writes it) to
    `path` (PNG): the loss per epoch with the learning rate on a second axis, and images/s in a
    second panel if the file has it. Returns `path`."""
    history = read_history(history_csv)
    loss = history["loss"]
    epochs = history["epoch"] + 1 if "epoch" in history else np.arange(1, len(loss) + 1, dtype="float64")
    speed = history.get("images_per_second")
    panels = 2 if speed is not None and np.any(np.isfinite(speed)) else 1
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.2), squeeze=False)
    for axis in axes.flat:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis = axes[0, 0]
    axis.plot(epochs, loss, marker="o", markersize=3, color="tab:blue", label="loss")
    finite = loss[np.isfinite(loss)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 10:
        axis.set_yscale("log")
    axis.set_xlabel("epoch")
    axis.set_ylabel("loss", color="tab:blue")
    first, last = (f"{finite[0]:.4g}", f"{finite[-1]:.4g}") if finite.size else ("nan", "nan")
    axis.set_title(f"loss {first} -> {last} ({len(loss)} epochs)", fontsize=9)
    if "lr" in history and np.any(np.isfinite(history["lr"])):
        twin = axis.twinx()
        twin.plot(epochs, history["lr"], color="tab:orange", linestyle="--", label="lr")
        twin.set_ylabel("learning rate", color="tab:orange")
        twin.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if panels == 2:
        axes[0, 1].plot(epochs, speed, marker="o", markersize=3, color="tab:green")
        axes[0, 1].set_xlabel("epoch")
        axes[0, 1].set_ylabel("images / s")
        axes[0, 1].set_ylim(bottom=0)
        median = float(np.nanmedian(speed))
        axes[0, 1].set_title(f"throughput (median {median:.0f} images/s)", fontsize=9)
    figure.tight_layout()
    return _save(figure, path, dpi)


def load_images(data, count, image_size, split="test", seed=0):
    """`count` images (a seeded subset of `split` of a `--data` spec), resized, `(count, S, S, 3)`."""
    from keras_mfm import data as data_lib

    subset = data_lib.load_split(data, split, limit=count, seed=seed)
    batches = data_lib.evaluation_dataset(subset, image_size, count, cache=False)
    images, _ = next(iter(batches))
    return np.asarray(images, dtype="float32")


def main(argv=None):
    """`python -m keras_mfm.visualize --data PATH --output docs/corruptions.png` (the README figure)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__ + "\n\n" + __doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="image folder, .tar.gz or tfds:NAME (as train.py)")
    parser.add_argument("--output", default="docs/corruptions.png", help="PNG file to write")
    parser.add_argument("--images", type=int, default=3, help="number of test images")
    parser.add_argument("--image-size", type=int, default=32, help="image size")
    parser.add_argument("--patch-size", type=int, default=4, help="ViT patch of the token masks")
    parser.add_argument("--seed", type=int, default=0, help="which images and masks")
    args = parser.parse_args(argv)
    import os

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    images = load_images(args.data, args.images, args.image_size, seed=args.seed)
    print(corruption_figure(images, args.output, args.patch_size, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
