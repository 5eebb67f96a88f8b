"""Figures of what the encoder sees: images, their spectra and each pre-training corruption.

`corruption_views(images)` applies every corruption of the registry's objectives to a batch
(low-/high-pass frequency masks, SR, deblur, denoise, and the token masks of MAE and SimMIM drawn
as grey patches); `corruption_figure(images, path)` lays them out with matplotlib, one image per
pair of rows: the pictures, then their centred log-magnitude spectra `log(1 + |fftshift(fft2(x))|)`
(mean over the channels). Colour maps and the spectrum scale are shared along a row, so the kept and
removed frequencies compare at a glance.
"""

import numpy as np
from keras import ops

from keras_mfm import frequency
from keras_mfm.layers.frequency_masking import FrequencyMasking
from keras_mfm.layers.restoration import AdditiveNoise, Downsampling, GaussianBlur
from keras_mfm.masking import select_tokens

GREY = 0.5  # fill colour of a masked patch


def log_spectrum(images):
    """`(B, H, W, C)` in [0, 1] -> `(B, H, W)` centred `log(1 + |F|)`, F the un-normalised 2-D FFT,
    averaged over the channels (NumPy)."""
    images = np.asarray(images, dtype="float64")
    spectrum = np.fft.fftshift(np.fft.fft2(images, axes=(1, 2)), axes=(1, 2))
    return np.log1p(np.abs(spectrum)).mean(axis=-1)


def grey_patches(images, patch_mask, patch_size):
    """Images with the patches where `patch_mask` `(B, N)` is 1 painted grey (row-major patches)."""
    images = np.array(images, dtype="float32")
    batch, height, width, _ = images.shape
    columns = width // patch_size
    for b, row in enumerate(np.asarray(patch_mask)):
        for index in np.flatnonzero(row):
            r, c = divmod(int(index), columns)
            images[b, r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size] = GREY
    return images


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


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
