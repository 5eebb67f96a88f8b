"""Data input: image folders, .tar.gz archives of them and TFDS, as `tf.data` pipelines.

`tf.data` feeds every Keras backend (`model.fit` converts its batches), so this is the one module
of the library that uses TensorFlow directly.

Data specs (the `--data` argument):

- an image-folder root holding `train/` and `test/`, one sub-folder per class (the standard
  layout; class index = position of the folder name in sorted order);
- a `.tar.gz` (or `.tgz`/`.tar`) of such a folder, extracted once into a cache folder
  (`$KERAS_MFM_CACHE`, default `~/.cache/keras_mfm`), wherever inside the archive the root is;
- `tfds:NAME` for a TensorFlow Datasets data set (downloaded by TFDS if it can be).

Images come out as float32 in [0, 1], NHWC; normalisation is the encoder's job.
"""

import contextlib
import dataclasses
import hashlib
import os
import shutil
import socket
import tarfile
import tempfile
import threading

import numpy as np

AUGMENT_GROUP = 16  # images per RandAugment call in finetune_dataset
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SPLITS = ("train", "test")


class DataError(ValueError):
    """Bad `--data`: missing, empty or malformed; the message says what to fix."""


def _tf():
    import tensorflow as tf

    return tf


# -- locating the data ---------------------------------------------------------------------------
def cache_dir():
    return os.path.expanduser(os.environ.get("KERAS_MFM_CACHE", "~/.cache/keras_mfm"))


def _file_digest(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_root(folder, depth=3):
    """The folder (at most `depth` levels down) that holds a `train/` sub-folder."""
    if os.path.isdir(os.path.join(folder, "train")):
        return folder
    if depth == 0:
        return None
    for name in sorted(os.listdir(folder)):
        child = os.path.join(folder, name)
        if os.path.isdir(child) and not name.startswith("."):
            found = _find_root(child, depth - 1)
            if found:
                return found
    return None


def extract_archive(path, destination=None):
    """Extracts an image-folder archive once (atomically) and returns the folder holding `train/`."""
    destination = destination or os.path.join(cache_dir(), "datasets")
    name = os.path.basename(path).split(".")[0]
    target = os.path.join(destination, f"{name}-{_file_digest(path)[:16]}")
    if not os.path.isdir(target):
        os.makedirs(destination, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".extract-", dir=destination)
        try:
            with tarfile.open(path) as archive:
                archive.extractall(staging, filter="data")
        except (tarfile.TarError, EOFError, OSError) as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise DataError(f"Cannot extract {path}: {error} (corrupt or not a tar archive?)") from error
        try:
            os.rename(staging, target)
        except OSError:  # another process won the race: use its copy
            shutil.rmtree(staging, ignore_errors=True)
    root = _find_root(target)
    if root is None:
        raise DataError(f"The archive {path} holds no image folder with a train/ sub-folder.")
    return root


@dataclasses.dataclass(frozen=True)
class DataSource:
    """Where the images are: an image-folder `root` or a TFDS `tfds_name`."""

    spec: str
    root: str = None
    tfds_name: str = None
    skip_unreadable: bool = False  # leave out image files that cannot be decoded (a full decode of each)


def resolve_data(spec, skip_unreadable=False):
    """`--data` string -> `DataSource` (extracting an archive if needed). Raises `DataError`.

    `skip_unreadable`: image folders leave out the files that cannot be decoded (empty, not an
    image, truncated), with a warning counting them, instead of stopping at the first.
    """
    if isinstance(spec, DataSource):
        return dataclasses.replace(spec, skip_unreadable=spec.skip_unreadable or skip_unreadable)
    if spec is None or str(spec).strip() == "":
        raise DataError("No data given: pass --data with an image folder, a .tar.gz of one or tfds:NAME.")
    spec = str(spec)
    if spec.startswith("tfds:"):
        name = spec[len("tfds:"):]
        if not name:
            raise DataError("`tfds:` needs a data set name, e.g. tfds:cifar10.")
        return DataSource(spec=spec, tfds_name=name, skip_unreadable=skip_unreadable)
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.exists(path):
        raise DataError(f"Data path {spec} does not exist.")
    if os.path.isfile(path):
        if not path.endswith((".tar.gz", ".tgz", ".tar")):
            raise DataError(f"Data file {spec} is not a .tar.gz/.tgz/.tar archive of an image folder.")
        return DataSource(spec=spec, root=extract_archive(path), skip_unreadable=skip_unreadable)
    root = _find_root(path, depth=1)
    if root is None:
        raise DataError(
            f"Data folder {spec} has no train/ sub-folder: expected <root>/train/<class>/<image> "
            "(and <root>/test/<class>/<image> for evaluation)."
        )
    return DataSource(spec=spec, root=root, skip_unreadable=skip_unreadable)


#: the first bytes of each image format tf.io.decode_image reads
IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
#: folders that are never classes (archive tools' metadata, hidden folders)
IGNORED_FOLDERS = ("__MACOSX",)


def _is_class_folder(split_dir, name):
    return os.path.isdir(os.path.join(split_dir, name)) and not name.startswith(".") and name not in IGNORED_FOLDERS


def _unreadable(path):
    """Why the image file `path` cannot be decoded (empty, or not an image format), or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as error:
        return error.strerror or "cannot be read"
    if not head:
        return "is empty (0 bytes)"
    if not head.startswith(IMAGE_SIGNATURES):
        return "is not a JPEG, PNG, GIF or BMP image (its first bytes say otherwise)"
    return None


def undecodable_images(paths):
    """The files of `paths` that TensorFlow cannot decode as an image (each decoded in full, in
    parallel: about as long as one pass over the data), in the order of `paths`."""
    tf = _tf()
    if not paths:
        return []

    def decodes(position, path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return position, tf.shape(image)  # an output, so that the decoding is not pruned away

    positions = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), list(paths)))
    positions = positions.map(decodes, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors().batch(4096)
    good = set(np.concatenate([batch.numpy() for batch, _ in positions] or [np.zeros(0, "int64")]).tolist())
    return [path for position, path in enumerate(paths) if position not in good]


@contextlib.contextmanager
def undecodable_named(source):
    """Turns a decoding failure inside a tf.data pipeline of `source`'s image folder (a truncated
    or corrupt file passes the first-bytes check) into a `DataError` naming the file(s)."""
    tf = _tf()
    try:
        yield
    except tf.errors.OpError:
        if source is None or source.root is None:
            raise
        bad = []
        for split in SPLITS:
            if os.path.isdir(os.path.join(source.root, split)):
                bad += undecodable_images(list_image_folder(os.path.join(source.root, split))[0])
        if not bad:
            raise
        more = f" ({len(bad) - 1} more such files in {source.spec})" if len(bad) > 1 else ""
        raise DataError(f"Image file {bad[0]} cannot be decoded (truncated or corrupt){more}; remove it, or "
                        "pass --skip-unreadable to leave unreadable files out.") from None


def list_image_folder(split_dir, skip_unreadable=False):
    """`split_dir/<class>/.../<image>` -> (paths, labels, class_names), sorted. Raises `DataError`.

    Images in sub-folders of a class folder belong to that class. Every file is checked by its
    first bytes: an empty or non-image file (e.g. text saved as .jpg) is a `DataError` naming it.
    With `skip_unreadable` every file is also decoded (`undecodable_images`), and those that fail
    either check are left out, with a warning counting them. A class folder without images is an
    error (it would still take a label).
    """
    if not os.path.isdir(split_dir):
        raise DataError(f"Missing data folder {split_dir}.")
    class_names = sorted(name for name in os.listdir(split_dir) if _is_class_folder(split_dir, name))
    if not class_names:
        raise DataError(f"Data folder {split_dir} has no class sub-folders (expected {split_dir}/<class>/<image>).")
    paths, labels, skipped = [], [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(split_dir, name)
        files = []
        for parent, folders, names in os.walk(folder):
            folders[:] = sorted(f for f in folders if not f.startswith(".") and f not in IGNORED_FOLDERS)
            files += [os.path.join(parent, f) for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
        files.sort()
        good = []
        for path in files:
            problem = _unreadable(path)
            if problem is None:
                good.append(path)
            elif skip_unreadable:
                skipped.append(path)
            else:
                raise DataError(f"Image file {path} {problem}; remove it, or pass --skip-unreadable "
                                "(skip_unreadable=True) to leave unreadable files out.")
        if skip_unreadable:  # the first bytes are right; decode those files once to find the truncated ones
            undecodable = set(undecodable_images(good))
            skipped += sorted(undecodable)
            good = [f for f in good if f not in undecodable]
        if not good:
            raise DataError(f"Class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); remove it or "
                            "add its images.")
        paths.extend(good)
        labels.extend([label] * len(good))
    if skipped:
        import warnings

        warnings.warn(f"{len(skipped)} unreadable image file(s) in {split_dir} left out, e.g. {skipped[0]}.",
                      stacklevel=2)
    return paths, np.asarray(labels, dtype="int32"), class_names


# -- TFDS ----------------------------------------------------------------------------------------
def _network_reachable(host="storage.googleapis.com", timeout=3.0):
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(None)


def _tfds_split(source, split, timeout=120.0):
    import tensorflow_datasets as tfds

    name = source.tfds_name
    hint = "pass --data with an image folder or a .tar.gz of one (e.g. --data ../shared/data/cifar10-jpeg.tar.gz)"
    try:
        builder = tfds.builder(name)
    except Exception as error:  # unknown name, bad version...
        raise DataError(f"Unknown TFDS data set {name!r} ({error}); {hint}.") from error
    if not builder.is_prepared():
        if not _network_reachable():
            raise DataError(f"TFDS data set {name!r} is not on this machine and cannot be downloaded (no network); "
                            f"{hint}.")
        failure = []

        def prepare():
            try:
                builder.download_and_prepare()
            except Exception as error:  # noqa: BLE001 - reported below
                failure.append(error)

        worker = threading.Thread(target=prepare, daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive() or failure:
            reason = failure[0] if failure else f"no result after {timeout:.0f} s"
            raise DataError(f"Cannot download TFDS data set {name!r}: {reason}; {hint}.")
    splits = builder.info.splits
    if split == "test" and "test" not in splits:
        split = "validation"
    if split not in splits:
        raise DataError(f"TFDS data set {name!r} has no {split!r} split (it has {sorted(splits)}).")
    dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    features = builder.info.features
    class_names = list(features["label"].names) if "label" in features else []
    return dataset, int(splits[split].num_examples), class_names


# -- pipelines -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Split:
    """A split as decoded `(image uint8 (h, w, 3), label int32, index int64)` elements."""

    dataset: object
    num_examples: int
    class_names: list


def load_split(source, split="train", limit=None, seed=0):
    """One split of a `DataSource` (or spec string) as a `Split` of decoded images, unbatched.

    `limit`: keep a seeded random subset of that many images (in their original order), e.g. for
    a quick k-NN on CPU; `index` stays the position in the full split.
    """
    tf = _tf()
    if isinstance(source, str):
        source = resolve_data(source)
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    if source.tfds_name:
        dataset, count, class_names = _tfds_split(source, split)
        dataset = dataset.enumerate().map(
            lambda index, item: (_to_rgb(item[0]), tf.cast(item[1], "int32"), index),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        if limit is not None and limit < count:
            keep = tf.constant(_subset(count, limit, seed))
            dataset = dataset.filter(lambda image, label, index: tf.reduce_any(tf.equal(keep, index)))
            count = limit
        return Split(dataset, count, class_names)
    paths, labels, class_names = list_image_folder(os.path.join(source.root, split), source.skip_unreadable)
    indices = np.arange(len(paths), dtype="int64")
    if limit is not None and limit < len(paths):
        indices = _subset(len(paths), limit, seed)
        paths, labels = [paths[i] for i in indices], labels[indices]
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels, indices))

    def decode(path, label, index):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return _to_rgb(image), label, index

    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return Split(dataset, len(paths), class_names)


def _subset(count, limit, seed):
    if limit < 1:
        raise DataError(f"A subset needs at least one image, got limit={limit}.")
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False)).astype("int64")


def _to_rgb(image):
    tf = _tf()
    image = tf.convert_to_tensor(image)
    if image.shape.rank == 2:
        image = image[:, :, None]
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    elif image.shape[-1] is None or image.shape[-1] > 3:
        image = image[:, :, :3]
    return tf.ensure_shape(tf.cast(image, "uint8"), (None, None, 3))


def random_resized_crop(image, size, seed, scale=(0.2, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)):
    """Inception-style crop (area in `scale` of the image, aspect in `ratio`), resized to `size`.

    Stateless: the `seed` (int32/int64 `[2]`) fixes the crop. Returns the float32 image in [0, 1]
    and the crop box `(y0, x0, y1, x1)` as fractions of the source image (for FAMT's importance
    maps, which must follow the crop).
    """
    tf = _tf()
    shape = tf.shape(image)
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.zeros((1, 0, 4)),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, extent)
    resized = tf.image.resize(tf.cast(crop, "float32") / 255.0, size, method="bilinear", antialias=True)
    height, width = tf.cast(shape[0], "float32"), tf.cast(shape[1], "float32")
    y0, x0 = tf.cast(begin[0], "float32"), tf.cast(begin[1], "float32")
    box = tf.stack(
        [y0 / height, x0 / width, (y0 + tf.cast(extent[0], "float32")) / height,
         (x0 + tf.cast(extent[1], "float32")) / width]
    )
    return tf.clip_by_value(resized, 0.0, 1.0), box


def resize_image(image, size):
    """Un-augmented view: the whole image resized to `size`, float32 in [0, 1]."""
    tf = _tf()
    image = tf.cast(image, "float32") / 255.0
    if image.shape[0] == size[0] and image.shape[1] == size[1]:
        return image
    return tf.clip_by_value(tf.image.resize(image, size, method="bilinear", antialias=True), 0.0, 1.0)


def _size_pair(image_size):
    if isinstance(image_size, int):
        return (image_size, image_size)
    return tuple(int(s) for s in image_size)


def pretraining_dataset(
    split,
    image_size,
    batch_size,
    seed=0,
    augment=True,
    repeat=False,
    cache=True,
    shuffle=True,
    with_labels=False,
    crop_scale=(0.2, 1.0),
    with_geometry=False,
):
    """Batched pre-training input: RandomResizedCrop(scale 0.2-1) + horizontal flip.

    Yields `images` `(B, H, W, 3)` float32 in [0, 1] (or `(images, labels)` with `with_labels`),
    full batches only. With `with_geometry` it yields a dict `{"images", "index" (B,) int64,
    "box" (B, 4) float32 (y0, x0, y1, x1) fractions of the source image, "flip" (B,) int32 0/1}`: what
    FAMT needs to make each image's importance map follow its crop and flip. Deterministic given
    `seed`: the crops and flips come from stateless ops fed by `tf.data.Dataset.random(seed)` and
    the shuffle is seeded (re-shuffled every epoch).
    `cache` keeps the decoded images in memory (right for CIFAR-sized data).
    """
    tf = _tf()
    size = _size_pair(image_size)
    if batch_size <= 0:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    if split.num_examples < batch_size:
        raise DataError(
            f"The split has {split.num_examples} images, fewer than one batch of {batch_size}."
        )
    dataset = split.dataset
    if cache:
        dataset = dataset.cache()
    if shuffle:
        dataset = dataset.shuffle(
            min(split.num_examples, 100_000), seed=seed, reshuffle_each_iteration=True
        )
    if repeat:
        dataset = dataset.repeat()
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(3)
    dataset = tf.data.Dataset.zip((dataset, seeds))

    def transform(item, draw):
        crop_seed, flip_seed = tf.stack([draw[0], draw[1]]), tf.stack([draw[2], draw[0]])
        return _training_view(item, size, crop_seed, flip_seed, augment, crop_scale, with_geometry, with_labels)

    dataset = dataset.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _training_view(item, size, crop_seed, flip_seed, augment=True, crop_scale=(0.2, 1.0), with_geometry=False,
                   with_labels=False):
    """One `(image, label, index)` -> its augmented view (crop + flip from the stateless seeds)."""
    tf = _tf()
    image, label, index = item
    if augment:
        image, box = random_resized_crop(image, size, crop_seed, scale=crop_scale)
        flip = tf.random.stateless_uniform((), seed=flip_seed) < 0.5
        image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
    else:
        image = resize_image(image, size)
        box, flip = tf.constant([0.0, 0.0, 1.0, 1.0]), tf.constant(False)
    image = tf.ensure_shape(image, size + (3,))
    if with_geometry:
        # flip as int32 0/1: tf.distribute averages a first batch when it builds a model, which a bool cannot be
        return {"images": image, "index": index, "box": box, "flip": tf.cast(flip, "int32")}
    return (image, label) if with_labels else image


def epoch_seed(seed, epoch):
    """The int64 seed of epoch `epoch` of a run seeded `seed` (shuffle and crops of that epoch)."""
    return int(seed) * 1_000_003 + int(epoch)


def pretraining_epoch(split, image_size, batch_size, steps, epoch, seed=0, skip_steps=0, with_geometry=False,
                      crop_scale=(0.2, 1.0), cached=None):
    """The batches of epoch `epoch` of a run: a function of `(seed, epoch)` alone, so a run resumed at
    any step sees exactly the batches the uninterrupted run saw.

    The split shuffled with `epoch_seed(seed, epoch)` (re-shuffled when an epoch spans several
    passes), the view at position `j` of the epoch cropped and flipped with the stateless seeds
    `(epoch_seed, 2j)` and `(epoch_seed, 2j + 1)`, full batches, the first `steps` of them, of which
    the first `skip_steps` are dropped (a resume inside the epoch). Yields what
    `pretraining_dataset` yields (images, or with `with_geometry` the dict FAMT reads).

    Args:
        cached: `split.dataset.cache()` made once for the whole run (decoded images in memory).
    """
    tf = _tf()
    size = _size_pair(image_size)
    if split.num_examples < batch_size:
        raise DataError(f"The split has {split.num_examples} images, fewer than one batch of {batch_size}.")
    cached = split.dataset.cache() if cached is None else cached
    passes = -(-steps * batch_size // split.num_examples)  # passes over the split this epoch
    key = epoch_seed(seed, epoch)
    views = cached.shuffle(split.num_examples, seed=key, reshuffle_each_iteration=True).repeat(passes)

    def transform(position, item):
        crop_seed = tf.stack([tf.constant(key, "int64"), 2 * position])
        flip_seed = tf.stack([tf.constant(key, "int64"), 2 * position + 1])
        return _training_view(item, size, crop_seed, flip_seed, True, crop_scale, with_geometry)

    views = views.enumerate().map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    batches = views.batch(batch_size, drop_remainder=True).take(steps).skip(skip_steps)
    return batches.prefetch(tf.data.AUTOTUNE)


def indexed_dataset(split, image_size, batch_size):
    """Batched, un-augmented `(images, index)` in order: the views FAMT scores its importance on."""
    tf = _tf()
    size = _size_pair(image_size)
    dataset = split.dataset.map(
        lambda image, label, index: (tf.ensure_shape(resize_image(image, size), size + (3,)), index),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(split, image_size, batch_size, cache=True):
    """Batched, un-augmented `(images, labels)`: each image resized to `image_size`, in order."""
    tf = _tf()
    size = _size_pair(image_size)
    dataset = split.dataset
    dataset = dataset.map(
        lambda image, label, index: (tf.ensure_shape(resize_image(image, size), size + (3,)), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if cache:
        dataset = dataset.cache()
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def finetune_dataset(
    split,
    image_size,
    batch_size,
    num_classes,
    seed=0,
    rand_augment=9.0,
    random_erasing=0.25,
    mixup=0.8,
    cutmix=1.0,
    switch_prob=0.5,
    crop_scale=(0.08, 1.0),
    repeat=False,
    cache=True,
    deterministic=True,
):
    """Fine-tuning input, the MAE/DeiT recipe built from Keras core augmentation layers.

    Per image: RandomResizedCrop (area `crop_scale`) + horizontal flip, `keras.layers.RandAugment`
    (2 ops, strength up to `rand_augment / 10`, i.e. magnitude 9 -> 0.9; 0 turns it off; the ops
    are drawn per group of `AUGMENT_GROUP` images) and `keras.layers.RandomErasing` with
    probability `random_erasing`. Per batch, on one-hot labels:
    `keras.layers.MixUp(alpha=mixup)` or `keras.layers.CutMix(factor=cutmix)`, one of the two
    chosen with probability `switch_prob` for CutMix (0 turns either off).

    Yields `(images (B, H, W, 3) float32 in [0, 1], labels (B, num_classes) float32)`, full
    batches only, the same stream for the same `seed`. The Keras augmentation layers draw from
    stateful generators, so with `deterministic` (default) they run in one sequential map and every
    draw lands on the same images each time; `deterministic=False` runs them in a parallel map,
    faster with many cores but a different stream on every run (crops, flips and order stay fixed).
    """
    import keras

    tf = _tf()
    size = _size_pair(image_size)
    if not 0 <= random_erasing <= 1 or not 0 <= switch_prob <= 1:
        raise ValueError("`random_erasing` and `switch_prob` are probabilities in [0, 1].")
    if not 0 <= rand_augment <= 10:
        raise ValueError(f"`rand_augment` is a magnitude in [0, 10] (0: off), got {rand_augment}.")
    if mixup < 0 or cutmix < 0:
        raise ValueError("`mixup` and `cutmix` are Beta-distribution parameters >= 0 (0: off).")
    dataset = pretraining_dataset(
        split, size, batch_size, seed=seed, augment=True, repeat=repeat, cache=cache, with_labels=True,
        crop_scale=crop_scale,
    )
    per_group = []
    if rand_augment > 0:
        per_group.append(keras.layers.RandAugment(value_range=(0, 1), factor=rand_augment / 10, seed=seed))
    if random_erasing > 0:
        per_group.append(
            keras.layers.RandomErasing(factor=(random_erasing, random_erasing), value_range=(0, 1), seed=seed + 1)
        )

    def augment(images, labels):
        for layer in per_group:
            images = layer(images, training=True)
        images = tf.clip_by_value(tf.cast(images, "float32"), 0.0, 1.0)
        return images, tf.one_hot(labels, num_classes)

    # Keras' RandAugment draws its ops once per call (strengths per image): calling it on groups of
    # AUGMENT_GROUP images varies the ops within a batch at a fraction of the per-image cost.
    parallel = None if deterministic else tf.data.AUTOTUNE
    dataset = (
        dataset.unbatch()
        .batch(AUGMENT_GROUP)
        .map(augment, num_parallel_calls=parallel)
        .unbatch()
        .batch(batch_size, drop_remainder=True)
    )
    mix = keras.layers.MixUp(alpha=mixup, seed=seed + 2) if mixup > 0 else None
    cut = keras.layers.CutMix(factor=cutmix, seed=seed + 3) if cutmix > 0 else None
    if mix or cut:
        # The MixUp-or-CutMix coin comes from a generator that, like the layers', carries on across
        # epochs (`Dataset.random(rerandomize_each_iteration=True)` would depend on how many
        # iterators were made, and Keras' fit makes an extra one).
        coins = tf.random.Generator.from_seed(seed + 4)

        def apply(layer, images, labels):
            out = layer({"images": images, "labels": labels}, training=True)
            return tf.cast(out["images"], "float32"), tf.cast(out["labels"], "float32")

        def mix_batch(images, labels):
            if mix and cut:
                use_cutmix = coins.uniform(()) < switch_prob
                images, labels = tf.cond(
                    use_cutmix, lambda: apply(cut, images, labels), lambda: apply(mix, images, labels)
                )
            else:
                images, labels = apply(mix or cut, images, labels)
            return tf.ensure_shape(images, (batch_size, *size, 3)), tf.ensure_shape(labels, (batch_size, num_classes))

        dataset = dataset.map(mix_batch, num_parallel_calls=parallel)
    return dataset.prefetch(tf.data.AUTOTUNE)


# -- your own data for AMT/FAMT ---------------------------------------------------------------------
def with_index(images, box=None, flip=None):
    """Your training images as the inputs an AMT/FAMT model looks its importance maps up with:
    `{"images", "index", "box", "flip"}`.

    - A NumPy array `(N, H, W, 3)` in [0, 1] -> a dict of arrays for `model.fit(x=...)` (which
      shuffles rows together): `index` 0..N-1, and unless given, the whole image (`box` (N, 4) =
      (0, 0, 1, 1) as (y0, x0, y1, x1) fractions) and no flip (`flip` (N,) int 0/1).
    - A `tf.data.Dataset` of single images (or `(image, ...)` tuples), **before** shuffling,
      augmentation and batching -> the same dict per element, `index` its position. If you crop or
      flip the image afterwards, update "box" and "flip" in the same map, so that the map follows.

    The refresh scores the same images un-augmented in the same order: `indexed_batches`.
    """
    if type(images).__module__.startswith("tensorflow") and hasattr(images, "element_spec"):
        return _dataset_with_index(images)
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"with_index: images must be (N, height, width, 3); got shape {images.shape}.")
    count = len(images)
    whole = np.tile(np.array([[0.0, 0.0, 1.0, 1.0]], "float32"), (count, 1))
    box = whole if box is None else np.asarray(box, "float32")
    flip = np.zeros(count, "int32") if flip is None else np.asarray(flip, "int32")
    if box.shape != (count, 4) or flip.shape != (count,):
        raise ValueError(f"with_index: box must be ({count}, 4) and flip ({count},); got {box.shape} and {flip.shape}.")
    return {"images": images, "index": np.arange(count, dtype="int64"), "box": box, "flip": flip}


def _dataset_with_index(dataset):
    tf = _tf()
    spec = dataset.element_spec
    image_spec = spec[0] if isinstance(spec, tuple) else spec
    if not isinstance(image_spec, tf.TensorSpec) or image_spec.shape.rank != 3:
        raise ValueError(
            f"with_index: the data set must yield single images (height, width, 3), before batching; its "
            f"elements are {spec}. Apply with_index first, then shuffle, augment and batch."
        )

    def view(index, element):
        image = element[0] if isinstance(element, tuple) else element
        return {"images": image, "index": index, "box": tf.constant([0.0, 0.0, 1.0, 1.0]),
                "flip": tf.constant(0, tf.int32)}

    return dataset.enumerate().map(view)


def with_importance(dataset, model):
    """Batches of `{"images", "index", "box", "flip", ...}` (a `tf.data.Dataset`, e.g.
    `pretraining_epoch(..., with_geometry=True)`), each with the stored importance rows of its images
    from the host table of `model` (`importance_location="host"`): `importance_values` `(B, N)` in
    the table's storage dtype and `importance_steps` `(B,)` float32.

    The rows are read when a batch is taken from the pipeline (after its prefetching), from the table
    as it is then, so batches taken after a refresh carry the new maps. A data set iterated across
    epochs by one iterator (`repeat()` with `steps_per_epoch`) can hand out a few batches made before
    a refresh: make a fresh pipeline per epoch (as `train.py` does) for the exact schedule.
    """
    tf = _tf()
    table = getattr(model, "host_table", None)
    if table is None:
        raise ValueError(
            "with_importance: the model keeps no importance table on the host; build it with importance='famt' "
            "(or 'amt') and importance_location='host'."
        )
    spec = dataset.element_spec
    inputs_spec = spec[0] if isinstance(spec, tuple) else spec
    if not isinstance(inputs_spec, dict) or "index" not in inputs_spec:
        raise ValueError(
            f"with_importance: the batches must be dicts with an image 'index' (data.with_index, or "
            f"pretraining_dataset(with_geometry=True)); got {spec}."
        )
    dtype = tf.as_dtype(table.storage)
    patches = table.shape[1]

    def look_up(index):
        current = model.host_table  # the table now, refreshed or loaded meanwhile
        return current.rows(index)

    def attach(inputs):
        values, steps = tf.numpy_function(look_up, [inputs["index"]], (dtype, tf.float32), stateful=True)
        values = tf.ensure_shape(values, (None, patches))
        steps = tf.ensure_shape(steps, (None,))
        return {**inputs, "importance_values": values, "importance_steps": steps}

    if isinstance(spec, tuple):
        return dataset.map(lambda inputs, *rest: (attach(inputs), *rest))
    return dataset.map(attach)


def indexed_batches(images, batch_size=256):
    """`(images, index)` batches of `images` (an `(N, H, W, 3)` array) in order: what
    `importance.ImportanceRefresh(dataset_fn=lambda: indexed_batches(images))` scores."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"indexed_batches: images must be (N, height, width, 3); got shape {images.shape}.")
    # a list of views (no copy of the images), so that progress bars know the number of batches
    return [(images[start:start + batch_size], np.arange(start, min(start + batch_size, len(images)), dtype="int64"))
            for start in range(0, len(images), batch_size)]
