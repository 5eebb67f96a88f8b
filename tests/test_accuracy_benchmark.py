"""benchmarks/accuracy.py: the hold-out split, the raw-pixel baseline and a tiny end-to-end study
(table, JSON per row, skipping finished rows, resuming a pre-training)."""

import importlib.util
import json
import os

import numpy as np
import pytest

from tests.conftest import REPO
from tests.test_data import write_folder


def load_benchmark():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", os.path.join(REPO, "benchmarks", "accuracy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_MFM_CACHE", str(tmp_path / "cache"))  # hold-out / subset folders go there
    return load_benchmark()


def listing(folder):
    return sorted(
        (name, image) for name in os.listdir(folder) for image in os.listdir(os.path.join(folder, name))
    )


def test_holdout_folder_is_a_seeded_partition_of_the_training_split(tmp_path, bench):
    root = write_folder(str(tmp_path / "set"), per_class=5)
    folder = bench.holdout_folder(root, 4, seed=0)
    train, held = listing(os.path.join(folder, "train")), listing(os.path.join(folder, "test"))
    assert len(train) == 6 and len(held) == 4 and not set(train) & set(held)
    assert sorted(train + held) == listing(os.path.join(root, "train"))  # the real test split is not used
    assert bench.holdout_folder(root, 4, seed=0) == folder  # made once, reused
    other = bench.holdout_folder(root, 4, seed=1)
    assert other != folder and len(listing(os.path.join(other, "test"))) == 4
    with pytest.raises(ValueError, match="--holdout"):
        bench.holdout_folder(root, 10)


def test_raw_pixel_baseline_separates_separable_pixels(bench):
    from keras_mfm import evaluation

    rng = np.random.default_rng(0)

    def features(n):
        labels = rng.integers(0, 3, n)
        pixels = rng.uniform(0, 0.2, (n, 48))
        pixels[np.arange(n)[:, None], 16 * labels[:, None] + np.arange(16)] += 0.5  # class = bright third
        return evaluation.Features(pixels.astype("float32"), labels.astype("int64"))

    result = bench.raw_pixel_baseline(features(120), features(60), probe_epochs=20, batch_size=32)
    assert result["knn_top1"] == 100.0
    assert result["linear_top1"] > 90.0
    assert result["train_images"] == 120 and result["test_images"] == 60


def fake_result(row, knn, linear, pretrain_seconds=None, refresh=0.0):
    result = {"row": row, "evaluation": {"knn_top1": knn, "linear_top1": linear}, "eval_seconds": 60.0,
              "eval_cpu_seconds": 30.0}
    if pretrain_seconds is not None:
        result["pretrain"] = {"pretrain_wall_seconds": pretrain_seconds, "pretrain_cpu_seconds": 120.0,
                              "fit_seconds": pretrain_seconds - 10,
                              "refresh_seconds": refresh,
                              "fit_seconds_without_refresh": pretrain_seconds - 10 - refresh,
                              "final_loss": 0.5}
    return result


def test_finished_rows_are_skipped_and_tabulated(tmp_path, bench, capsys):
    root = write_folder(str(tmp_path / "set"), per_class=2)
    output = tmp_path / "study"
    rows = {"random": fake_result("random", 29.0, 37.0), "pixels": fake_result("pixels", 32.0, 35.0),
            "mae": fake_result("mae", 30.0, 38.0, 600.0), "famt": fake_result("famt", 31.0, 39.0, 540.0, 120.0)}
    for row, result in rows.items():
        (output / row).mkdir(parents=True)
        (output / row / "result.json").write_text(json.dumps(result))
    results = bench.main(["--data", root, "--output", str(output), "--methods", "mae,famt", "--pretrain-images", "0",
                          "--plot", str(tmp_path / "plot.png")])
    assert results == rows
    out = capsys.readouterr().out
    assert out.count("done already") == 4
    table = (output / "table.md").read_text().splitlines()
    assert table[0] == ("| row | pre-training CPU min | pre-training wall min (refresh) | loss | k-NN top-1 "
                        "| linear top-1 | eval CPU min (wall) |")
    assert table[2:] == [
        "| random init | none | none |  | 29.00 | 37.00 | 0.5 (1.0) |",
        "| raw pixels | none | none |  | 32.00 | 35.00 | 0.5 (1.0) |",
        "| mae | 2.0 | 10.0 | 0.5000 | 30.00 | 38.00 | 0.5 (1.0) |",
        "| famt | 2.0 | 9.0 (2.0) | 0.5000 | 31.00 | 39.00 | 0.5 (1.0) |",
    ]
    assert "\n".join(table) in out and os.path.getsize(tmp_path / "plot.png") > 0
    with pytest.raises(SystemExit, match="unknown method"):
        bench.main(["--data", root, "--output", str(output), "--methods", "mfm,bogus"])


@pytest.mark.slow  # a real (tiny) pre-training of two methods: ~30 s alone, minutes on a loaded machine
def test_tiny_study_writes_rows_table_skips_finished_rows_and_resumes(tmp_path, bench, capsys):
    root = write_folder(str(tmp_path / "set"), per_class=12, size=(16, 16))
    output = str(tmp_path / "study")
    argv = ["--data", root, "--output", output, "--methods", "mfm,mae", "--baselines", "random,pixels",
            "--depth", "1", "--image-size", "16", "--batch-size", "8", "--epochs", "1", "--steps-per-epoch", "1",
            "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--train-images", "20",
            "--probe-epochs", "2", "--verbose", "0", "--plot", str(tmp_path / "plot.png")]
    results = bench.main(argv)
    assert list(results) == ["random", "pixels", "mfm", "mae"]
    for row, result in results.items():
        saved = json.load(open(os.path.join(output, row, "result.json")))
        assert saved["row"] == row and saved["eval_seconds"] >= 0
        metrics = saved["evaluation"]
        assert 0 <= metrics["knn_top1"] <= 100 and 0 <= metrics["linear_top1"] <= 100
        assert metrics["train_images"] == 20 and metrics["test_images"] == 24
        if row in ("mfm", "mae"):
            info = saved["pretrain"]
            assert info["steps"] == 1 and info["pretrain_wall_seconds"] > 0 and info["refresh_seconds"] == 0
    table = open(os.path.join(output, "table.md")).read().splitlines()
    assert table[0].startswith("| row | pre-training CPU min") and len(table) == 2 + 4
    assert [line.split("|")[1].strip() for line in table[2:]] == ["random init", "raw pixels", "mfm", "mae"]
    assert os.path.isfile(tmp_path / "plot.png")
    capsys.readouterr()

    # a second call skips every finished row
    before = os.path.getmtime(os.path.join(output, "mfm", "result.json"))
    bench.main(argv)
    out = capsys.readouterr().out
    assert out.count("done already") == 4
    assert os.path.getmtime(os.path.join(output, "mfm", "result.json")) == before

    # a row whose pre-training did not record its end resumes from its checkpoint
    for name in ("result.json", "pretrain.json"):
        os.remove(os.path.join(output, "mae", name))
    results = bench.main(argv)
    assert "[mae] resuming the pre-training" in capsys.readouterr().out
    assert results["mae"]["pretrain"]["resumed"] is True
