import os
import tarfile

import numpy as np
import pytest

from keras_mfm import data


def write_folder(root, classes=("cat", "dog"), per_class=3, size=(20, 24), splits=("train", "test")):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))
    return root


def test_image_folder_listing_and_labels(tmp_path):
    root = write_folder(str(tmp_path / "set"))
    paths, labels, classes = data.list_image_folder(os.path.join(root, "train"))
    assert classes == ["cat", "dog"]
    assert len(paths) == 6 and list(labels) == [0, 0, 0, 1, 1, 1]
    split = data.load_split(root, "train")
    assert split.num_examples == 6
    image, label, index = next(iter(split.dataset))
    assert image.shape == (20, 24, 3) and image.dtype.name == "uint8" and int(index) == 0


def test_tar_archive_is_extracted_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_MFM_CACHE", str(tmp_path / "cache"))
    root = write_folder(str(tmp_path / "src" / "toy"))
    archive = str(tmp_path / "toy.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="toy")
    first = data.resolve_data(archive).root
    assert os.path.isdir(os.path.join(first, "train", "cat")) and first.startswith(str(tmp_path / "cache"))
    marker = os.path.join(first, "marker")
    open(marker, "w").close()
    assert data.resolve_data(archive).root == first and os.path.exists(marker)  # not extracted again


def test_pretraining_pipeline_shapes_range_and_determinism(tmp_path):
    split = data.load_split(write_folder(str(tmp_path / "set"), per_class=8), "train")
    dataset = data.pretraining_dataset(split, 16, batch_size=4, seed=1)
    batches = [b.numpy() for b in dataset]
    assert len(batches) == 4 and batches[0].shape == (4, 16, 16, 3) and batches[0].dtype == np.float32
    assert all(b.min() >= 0 and b.max() <= 1 for b in batches)
    again = [b.numpy() for b in data.pretraining_dataset(split, 16, batch_size=4, seed=1)]
    np.testing.assert_array_equal(np.stack(batches), np.stack(again))
    other = [b.numpy() for b in data.pretraining_dataset(split, 16, batch_size=4, seed=2)]
    assert not np.array_equal(np.stack(batches), np.stack(other))
    with_labels = next(iter(data.pretraining_dataset(split, 16, batch_size=4, with_labels=True)))
    assert with_labels[1].shape == (4,)


def test_random_resized_crop_box_and_scale():
    import tensorflow as tf

    image = tf.constant(np.arange(40 * 50 * 3, dtype=np.uint8).reshape(40, 50, 3) % 251)
    areas = []
    for i in range(50):
        crop, box = data.random_resized_crop(image, (16, 16), tf.constant([i, 7]))
        y0, x0, y1, x1 = box.numpy()
        assert crop.shape == (16, 16, 3) and 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1
        areas.append((y1 - y0) * (x1 - x0))
    assert min(areas) >= 0.2 - 0.03 and max(areas) <= 1.0 and np.std(areas) > 0.05
    # the whole-image box reproduces a plain resize
    full, _ = data.random_resized_crop(image, (40, 50), tf.constant([0, 0]), scale=(1.0, 1.0), ratio=(1.25, 1.25))
    np.testing.assert_allclose(full.numpy(), image.numpy() / 255.0, atol=1e-6)


def test_evaluation_dataset_order_and_labels(tmp_path):
    split = data.load_split(write_folder(str(tmp_path / "set")), "test")
    images, labels = next(iter(data.evaluation_dataset(split, 16, batch_size=6)))
    assert images.shape == (6, 16, 16, 3) and list(labels.numpy()) == [0, 0, 0, 1, 1, 1]


def test_real_cifar10(cifar_root):
    split = data.load_split(cifar_root, "train")
    assert split.num_examples == 50_000 and split.class_names[0] == "airplane" and len(split.class_names) == 10
    batch = next(iter(data.pretraining_dataset(split, 32, batch_size=8, seed=0)))
    assert batch.shape == (8, 32, 32, 3) and 0.05 < float(batch.numpy().mean()) < 0.95


def test_bad_data(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.resolve_data(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no train/"):
        data.resolve_data(str(tmp_path / "empty"))
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    with pytest.raises(data.DataError, match="no class sub-folders"):
        data.load_split(str(tmp_path / "noclass"), "train")
    (tmp_path / "noimg" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(data.DataError, match="holds no images"):
        data.load_split(str(tmp_path / "noimg"), "train")
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"not a tar archive at all")
    with pytest.raises(data.DataError, match="Cannot extract"):
        data.resolve_data(str(broken))
    text = tmp_path / "file.txt"
    text.write_text("x")
    with pytest.raises(data.DataError, match="not a .tar.gz"):
        data.resolve_data(str(text))
    with pytest.raises(data.DataError, match="needs a data set name"):
        data.resolve_data("tfds:")
    split = data.load_split(write_folder(str(tmp_path / "few"), per_class=1), "train")
    with pytest.raises(data.DataError, match="fewer than one batch"):
        data.pretraining_dataset(split, 16, batch_size=64)


def test_bad_image_files_are_named_and_folders_are_read_as_a_user_expects(tmp_path):
    root = write_folder(str(tmp_path / "set"), per_class=2)
    train = os.path.join(root, "train")
    nested = os.path.join(train, "cat", "more")
    os.makedirs(nested)
    write_folder(str(tmp_path / "extra"), classes=("x",), per_class=1, splits=("s",))
    os.replace(str(tmp_path / "extra" / "s" / "x" / "0.png"), os.path.join(nested, "n.png"))
    os.makedirs(os.path.join(train, "__MACOSX", "cat"))  # an archive tool's metadata: not a class
    paths, labels, classes = data.list_image_folder(train)
    assert classes == ["cat", "dog"] and os.path.join(nested, "n.png") in paths  # nested images kept
    assert list(labels).count(0) == 3

    os.makedirs(os.path.join(train, "empty"))
    with pytest.raises(data.DataError, match="Class folder .*empty holds no images"):
        data.list_image_folder(train)
    os.rmdir(os.path.join(train, "empty"))
    for name, content, message in [("zero.jpg", b"", "is empty \\(0 bytes\\)"),
                                   ("text.jpg", b"hello, not a picture", "is not a JPEG, PNG, GIF or BMP image")]:
        bad = os.path.join(train, "dog", name)
        open(bad, "wb").write(content)
        with pytest.raises(data.DataError, match=f"Image file {bad} {message}"):
            data.list_image_folder(train)
        with pytest.warns(UserWarning, match="1 unreadable image file"):
            assert bad not in data.list_image_folder(train, skip_unreadable=True)[0]
        os.remove(bad)


def _truncated_jpeg(path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path, quality=90)
    content = open(path, "rb").read()
    open(path, "wb").write(content[: len(content) // 2])  # the right first bytes, half the data


def test_a_truncated_image_is_named_when_decoding_fails_and_can_be_skipped(tmp_path):
    root = write_folder(str(tmp_path / "set"), per_class=2)
    bad = os.path.join(root, "train", "dog", "truncated.jpg")
    _truncated_jpeg(bad)
    paths = data.list_image_folder(os.path.join(root, "train"))[0]
    assert bad in paths  # its first bytes are a JPEG's: only decoding finds it
    assert data.undecodable_images(paths) == [bad]

    source = data.resolve_data(root)
    with pytest.raises(data.DataError, match=f"Image file {bad} cannot be decoded .*--skip-unreadable"):
        with data.undecodable_named(source):
            list(data.load_split(source, "train").dataset)

    with pytest.warns(UserWarning, match="1 unreadable image file"):
        split = data.load_split(data.resolve_data(root, skip_unreadable=True), "train")
    assert split.num_examples == 4 and len(list(split.dataset)) == 4
