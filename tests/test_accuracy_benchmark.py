"""benchmarks/accuracy.py: the hold-out split, the raw-pixel baseline and a tiny end-to-end study
(table, JSON per row, skipping finished rows, resuming a pre-training)."""

import importlib.util
import json
import os
from pathlib import Path

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


def fake_result(row, knn, linear, cpu_minutes=0.0, refresh=None):
    result = {"row": row, "method": row, "backend": "torch", "budget": {"passes": 5, "steps": 1950},
              "knn_cls": knn, "knn_mean": knn + 1, "linear_cls": linear, "linear_mean": linear + 1,
              "finetune": None if row == "pixels" else linear + 10, "cpu_minutes": cpu_minutes,
              "eval_cpu_minutes": 0.5, "curve": [] if row in ("random", "pixels") else
              [{"fraction": 0.5, "cpu_minutes": cpu_minutes / 2, "knn_cls": knn - 1, "knn_mean": knn},
               {"fraction": 1.0, "cpu_minutes": cpu_minutes, "knn_cls": knn, "knn_mean": knn + 1}]}
    if row == "pixels":
        result["knn_mean"] = result["linear_mean"] = None
    else:
        result["finetune_deterministic"] = True
    if refresh is not None:
        result["refresh_minutes"] = refresh
    return result


def test_finished_rows_are_skipped(tmp_path, bench, capsys):
    root = write_folder(str(tmp_path / "set"), per_class=2)
    state, results_dir = tmp_path / "study", tmp_path / "results"
    rows = {"random": fake_result("random", 29.0, 37.0), "pixels": fake_result("pixels", 32.0, 35.0),
            "mae": fake_result("mae", 30.0, 38.0, 10.0), "famt": fake_result("famt", 31.0, 39.0, 9.0, 2.0)}
    for row, result in rows.items():
        (state / row).mkdir(parents=True)
        (state / row / "result.json").write_text(json.dumps(result))
    results = bench.main(["--data", root, "--state", str(state), "--rows", "random,pixels,mae,famt",
                          "--results", str(results_dir)])
    assert results == rows
    assert capsys.readouterr().out.count("done already") == 4
    saved = json.load(open(results_dir / "famt.json"))
    assert saved["knn_mean"] == 32.0 and saved["refresh_minutes"] == 2.0 and saved["curve"][-1]["fraction"] == 1.0


def test_a_kept_part_that_is_not_current_is_moved_aside_and_redone(tmp_path, bench):
    calls = []

    def compute():
        calls.append(1)
        return {"finetune_top1": 50.0, "deterministic": True}

    (tmp_path / "finetune.json").write_text(json.dumps({"finetune_top1": 40.0}))
    value = bench._part(str(tmp_path), "finetune", compute, current=bench._seeded_finetune)
    assert value["finetune_top1"] == 50.0 and calls == [1]
    assert json.loads((tmp_path / "finetune.superseded.json").read_text()) == {"finetune_top1": 40.0}
    assert bench._part(str(tmp_path), "finetune", compute, current=bench._seeded_finetune)["finetune_top1"] == 50.0
    assert calls == [1]  # current now: kept
    old = fake_result("mae", 30.0, 38.0, 10.0)
    del old["finetune_deterministic"]
    assert not bench.current_result("mae", old) and bench.current_result("mae", fake_result("mae", 30.0, 38.0))
    assert bench.current_result("pixels", fake_result("pixels", 32.0, 35.0)) and not bench.current_result("mae", None)


def test_committed_rows_with_the_same_settings_are_not_redone(tmp_path, bench, capsys):
    """A fresh machine (empty state) adopts a row's committed JSON when its settings match, and
    redoes it when any setting that changes the numbers differs."""
    root = write_folder(str(tmp_path / "set"), per_class=2)
    results_dir = tmp_path / "results"
    argv = ["--data", root, "--rows", "random", "--results", str(results_dir), "--backend", "torch"]
    settings = {k: v for k, v in vars(bench.parse_args(argv)).items()
                if k not in ("plot", "verbose", "state", "results")}
    public = dict(fake_result("random", 29.0, 37.0), settings=dict(settings, threads=1, rows="random,pixels"))
    results_dir.mkdir()
    (results_dir / "random.json").write_text(json.dumps(public))
    results = bench.main(argv + ["--state", str(tmp_path / "fresh")])
    assert "done already, same settings" in capsys.readouterr().out
    assert results["random"]["knn_cls"] == 29.0 and results["random"]["published"]
    assert (tmp_path / "fresh" / "random" / "result.json").is_file()
    other = bench.parse_args(argv + ["--seed", "1"])
    assert bench.published_result(other, "random") is None  # another seed: not the same row
    assert bench.published_result(bench.parse_args(argv + ["--results", ""]), "random") is None


def test_table_json_and_plot_of_finished_rows(tmp_path, bench):
    rows = {"random": fake_result("random", 29.0, 37.0), "pixels": fake_result("pixels", 32.0, 35.0),
            "mae": fake_result("mae", 30.0, 38.0, 10.0), "famt": fake_result("famt", 31.0, 39.0, 9.0, 2.0)}
    table = bench.markdown_table(rows, pending=["amt", "simmim"]).splitlines()
    assert table[0].startswith("| row | passes (steps) | pre-training CPU min")
    assert table[2:6] == [
        "| random init | none | none | 29.00 | 30.00 | 37.00 | 38.00 | 47.00 | 0.5 |",
        "| raw pixels | none | none | 32.00 |  | 35.00 |  |  | 0.5 |",
        "| mae | 5 (1950) | 10.0 | 30.00 | 31.00 | 38.00 | 39.00 | 48.00 | 0.5 |",
        "| famt | 5 (1950) | 9.0 (2.0) | 31.00 | 32.00 | 39.00 | 40.00 | 49.00 | 0.5 |",
    ]
    assert table[-1] == "Pending rows: amt, simmim."
    bench.plot(rows, str(tmp_path / "plot.png"))
    assert os.path.getsize(tmp_path / "plot.png") > 0
    with pytest.raises(SystemExit, match="unknown row"):
        bench.rows_of(bench.parse_args(["--rows", "mfm,bogus"]))


def test_budget_is_passes_over_the_whole_split(bench):
    args = bench.parse_args([])
    assert bench.budget(args, 50_000) == (10, 195)  # 5 passes of 50,000 at 128 = 1,953 steps -> 10 x 195
    assert [r for r in bench.ROWS[:5]] == ["random", "pixels", "mfm", "mae", "famt"]
    other = bench.parse_args(["--passes", "2"])
    assert bench.budget_key(other) != bench.budget_key(args)


@pytest.mark.slow  # a real (tiny) study of four rows: ~1 min alone, minutes on a loaded machine
def test_tiny_study_writes_rows_curves_json_and_resumes(tmp_path, bench, capsys):
    root = write_folder(str(tmp_path / "set"), per_class=12, size=(16, 16))
    state, results_dir = str(tmp_path / "study"), str(tmp_path / "results")
    argv = ["--data", root, "--state", state, "--results", results_dir, "--rows", "random,pixels,mfm,famt",
            "--depth", "1", "--image-size", "16", "--batch-size", "8", "--passes", "1", "--segments", "3",
            "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--train-images", "20",
            "--probe-epochs", "2", "--finetune-epochs", "1", "--verbose", "0", "--plot", str(tmp_path / "plot.png")]
    results = bench.main(argv)
    assert list(results) == ["random", "pixels", "mfm", "famt"]
    for row, result in results.items():
        saved = json.load(open(os.path.join(results_dir, f"{row}.json")))
        for key in ("method", "budget", "cpu_minutes", "knn_cls", "knn_mean", "linear_cls", "linear_mean",
                    "finetune", "curve"):
            assert key in saved, key
        if row in ("mfm", "famt"):
            assert [p["fraction"] for p in saved["curve"]] == [0.125, 0.25, 0.5, 1.0]
            assert saved["cpu_minutes"] > 0 and 0 <= saved["finetune"] <= 100
    assert results["famt"]["refresh_minutes"] > 0  # refreshed at segments 1 and 2
    assert os.path.isfile(tmp_path / "plot.png")
    capsys.readouterr()
    bench.main(argv)
    assert capsys.readouterr().out.count("done already") == 4
    # a row killed after its pre-training resumes: only the missing parts are computed
    os.remove(os.path.join(state, "mfm", "result.json"))
    os.remove(os.path.join(state, "mfm", "finetune.json"))
    before = os.path.getmtime(os.path.join(state, "mfm", "frozen_cls.json"))
    again = bench.main(argv)
    assert again["mfm"]["finetune"] == results["mfm"]["finetune"]  # the fine-tune is the same run again
    assert os.path.getmtime(os.path.join(state, "mfm", "frozen_cls.json")) == before
    # a row whose fine-tune is not the seeded one is re-fine-tuned, with the rest kept
    for path, key in ((os.path.join(state, "famt", "result.json"), "finetune_deterministic"),
                      (os.path.join(results_dir, "famt.json"), "finetune_deterministic"),
                      (os.path.join(state, "famt", "finetune.json"), "deterministic")):
        kept = json.loads(Path(path).read_text())
        del kept[key]
        Path(path).write_text(json.dumps(kept))
    capsys.readouterr()
    again = bench.main(argv)
    assert capsys.readouterr().out.count("done already") == 3
    assert os.path.isfile(os.path.join(state, "famt", "finetune.superseded.json"))
    assert again["famt"]["finetune"] == results["famt"]["finetune"] and again["famt"]["finetune_deterministic"]


def test_the_study_runs_from_a_copy_of_the_library_that_edits_cannot_reach(tmp_path, bench):
    """Autograph reads a traced function's source from its file: a run of hours must not see edits."""
    script = bench.snapshot_code(str(tmp_path / "state"))
    copy = os.path.dirname(os.path.dirname(script))
    assert os.path.isfile(script) and os.path.isfile(os.path.join(copy, "keras_mfm", "masking", "selection.py"))
    with open(os.path.join(REPO, "keras_mfm", "frequency.py")) as a, \
            open(os.path.join(copy, "keras_mfm", "frequency.py")) as b:
        assert a.read() == b.read()
    assert bench.snapshot_code(str(tmp_path / "state")) == script  # one copy per version of the sources
    assert os.listdir(tmp_path / "state" / "code") == [os.path.basename(copy)]


def test_two_studies_started_together_share_one_copy_of_the_library(tmp_path, bench, monkeypatch):
    """Another process renames its copy into place first: this one keeps that copy and leaves no temporary."""
    import shutil

    state = str(tmp_path / "state")
    real_replace = os.replace

    def another_process_wins(source, target):
        shutil.copytree(source, target)  # the other study's copy, the same sources
        return real_replace(source, target)  # fails: the target is a folder with files

    monkeypatch.setattr(os, "replace", another_process_wins)
    script = bench.snapshot_code(state)
    assert os.path.isfile(script)
    assert os.listdir(os.path.join(state, "code")) == [os.path.basename(os.path.dirname(os.path.dirname(script)))]


def test_the_mae_throw_ablation_is_mae_with_famts_counts_drawn_at_random(bench):
    from keras_mfm import methods, training

    args = bench.parse_args(["--rows", "mae_throw"])
    assert bench.rows_of(args) == ["mae_throw"] and "mae_throw" not in bench.ROWS  # not in the default study
    config = bench.pretrain_config(args, "mae_throw", None, None, bench.TRAIN_SPLIT)
    famt = bench.pretrain_config(args, "famt", None, None, bench.TRAIN_SPLIT)
    assert config.method == "mae" and (config.mask_ratio, config.throw_ratio) == methods.DEFAULT_RATIOS["famt"]
    assert config.lr == famt.lr and config.epochs == famt.epochs and config.steps_per_epoch == famt.steps_per_epoch
    model = training.build_model(config)  # what the row's pre-training builds
    assert model.importance is None and tuple(model.counts) == (28, 26, 10)  # FAMT's counts at 64 patches
    with pytest.raises(SystemExit, match="unknown row 'mae_trow'"):
        bench.rows_of(bench.parse_args(["--rows", "mae_trow"]))


def test_experiments_publish_beside_the_study_not_over_it(bench):
    study = os.path.join(REPO, "docs", "results", "cifar10")
    assert bench.parse_args([]).results == study
    assert bench.parse_args(["--backend", "torch", "--threads", "1", "--rows", "mae", "--no-curves"]).results == study
    held = bench.parse_args(["--rows", "mae,famt,mae_throw", "--holdout", "5000", "--passes", "2"])
    assert held.results == os.path.join(study, "experiments", "passes2-holdout5000")
    assert bench.parse_args(["--radius", "4"]).results == os.path.join(study, "experiments", "radius4")
    assert bench.parse_args(["--depth", "12", "--passes", "200"]).results == os.path.join(
        study, "experiments", "depth12-passes200")
    assert bench.parse_args(["--data", os.path.join(REPO, "..", "shared", "data", "cifar10-jpeg.tar.gz")]).results \
        == study  # the default archive, however it is written
    assert bench.parse_args(["--data", "/data/my set/"]).results == os.path.join(study, "experiments", "data-my_set")
    assert bench.parse_args(["--data", "tfds:cifar100", "--passes", "1"]).results == os.path.join(
        study, "experiments", "passes1-data-tfds_cifar100")
    assert bench.parse_args(["--holdout", "50", "--results", "elsewhere"]).results == "elsewhere"
    assert bench.parse_args(["--radius", "4", "--results", ""]).results == ""


def test_experiments_table_lists_every_published_experiment(tmp_path, bench, capsys):
    def row(method, knn, finetune):
        budget = {"passes": 2, "steps": 702, "batch_size": 128, "train_images": 45000, "depth": 4}
        return {"method": method, "budget": budget, "cpu_minutes": 0.0 if method == "random" else 12.5,
                "knn_cls": knn, "knn_mean": knn + 1, "linear_cls": 40.0, "linear_mean": 41.0, "finetune": finetune}

    root = tmp_path / "experiments"
    for experiment, rows in {"passes2-holdout5000": {"mae_throw": 31.0, "random": 27.5, "mae": 33.0},
                             "passes2-holdout5000-radius4": {"mfm": 28.0}}.items():
        (root / experiment).mkdir(parents=True)
        for name, knn in rows.items():
            (root / experiment / f"{name}.json").write_text(json.dumps(row(name, knn, knn - 5)))
    results = bench.experiment_results(str(root))
    assert list(results) == ["passes2-holdout5000: random", "passes2-holdout5000: mae",
                             "passes2-holdout5000: mae_throw", "passes2-holdout5000-radius4: mfm"]
    lines = bench.markdown_table(results).splitlines()
    assert lines[2].startswith("| passes2-holdout5000: random | none | none | 27.50 | 28.50 |")
    assert lines[4] == ("| passes2-holdout5000: mae_throw | 2 (702) | 12.5 | 31.00 | 32.00 | 40.00 | 41.00 | 26.00 "
                        "|  |")
    assert bench.experiment_results(str(tmp_path / "none")) == {}
    bench.DEFAULT_RESULTS = str(tmp_path)  # main --experiments reads <results>/experiments
    assert list(bench.main(["--experiments"])) == list(results)
    assert "passes2-holdout5000-radius4: mfm" in capsys.readouterr().out
