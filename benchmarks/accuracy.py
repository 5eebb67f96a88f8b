#!/usr/bin/env python
"""Does pre-training help? Every objective under one CIFAR-10 budget, against a random-init encoder
and raw pixels: k-NN and the linear probe on [CLS] and on mean-pooled tokens, a short fine-tune, and
k-NN learning curves.

    python benchmarks/accuracy.py --backend torch --threads 1                 # the study (resumable)
    python benchmarks/accuracy.py --backend torch --threads 1 --rows mfm,mae,famt --passes 200 \
        --depth 12 --state ~/.cache/keras_mfm/accuracy-gpu                      # GPU scale (see docs/)

Budget: `--passes` (5) passes over the **whole** training split (50,000 images at batch `--batch-size`
128: 1,950 steps), cut into `--segments` (10) epochs so that AMT/FAMT refresh on the authors' schedule
(first at 10 % of the run, then every 10 %: `--refresh-warmup 1 --refresh-interval 1` segments), each
refresh scoring the whole split and counting in the row's time. One architecture for every row: ViT-Tiny/4
(192-d, 3 heads) with `--depth` (4) blocks at 32x32 (64 tokens); MAE-family decoder 192-d x 4 x 3 heads.
Every method: its authors' recipe, init and schedule (keras_mfm's defaults) with the peak lr of its
family (`--lr-frequency` for mfm/sr/deblur/denoise, `--lr-tokens` for the token-masking methods), the
same seed and budget.

Protocols, the same for every row: frozen features ([CLS] and mean of the patch tokens) scored by
weighted k-NN (k 20, T 0.07) and MAE's linear probe (LARS, 90 epochs), bank / probe training set a seeded
`--train-images` (10,000) subset of the training split, queries all 10,000 test images; a fine-tune
(`evaluation.finetune`: its recipe, `--finetune-epochs` (5) epochs, 1 warm-up, on the same 10,000-image
subset, scored on the test split; random init fine-tuned the same way). Raw pixels: k-NN and the same
probe head on the flattened 3,072 pixels. Curves: k-NN ([CLS] and mean) of encoder snapshots after
1/8, 1/4 and 1/2 of the budget, and at the end, against the CPU time spent until then.

State lives outside the work tree, under `--state` (default `$KERAS_MFM_CACHE/accuracy/<budget key>`):
one folder per row (its run with checkpoints, snapshots, CPU ledger, evaluation parts). Every part is
resumable: a killed row continues from its last checkpoint, and finished parts are not redone. The
study runs from a copy of the library in the state folder (`code/<digest of the sources>`), so that
editing the work tree during the hours it runs cannot reach it. Each
finished row is written as `--results/<row>.json` (default `docs/results/cifar10/` for the default
study, `docs/results/cifar10/experiments/<the settings changed>/` for any other, e.g.
`passes2-holdout5000`, so that an experiment never replaces a row of the study); the table
(`table.md` in the state folder, printed) lists finished rows and names the pending ones.

Tuning without the test split: `--holdout N` holds out a seeded N-image part of the training split
(an image folder of symlinks in the cache) and scores on it instead of the test split. Held-out
experiments add rows outside the default set: `mae_throw` (MAE masking and throwing FAMT's shares
at random, from the first step), e.g. `--rows mae,famt,mae_throw --holdout 5000`. `--experiments` prints
one table of every published experiment.
Times: the CPU time of the process (with `--threads 1` its time alone on one core, whatever else the
machine runs), summed over resumed runs.
"""

import argparse
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HEADLINE = ("random", "pixels", "mfm", "mae", "famt")
ROWS = HEADLINE + ("sr", "deblur", "denoise", "amt", "simmim", "simmim_famt")
BASELINES = ("random", "pixels")
# Held-out experiments, not in the default rows: each is a method with one setting changed.
# mae_throw: MAE masking and throwing FAMT's shares at random (no importance, no refresh), which
# separates what FAMT's counts do from what its importance order does.
ABLATIONS = ("mae_throw",)
FREQUENCY_FAMILY = ("mfm", "sr", "deblur", "denoise")  # the MFM model (encoder + pixel-shuffle head)
CURVE_FRACTIONS = (0.125, 0.25, 0.5)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "cifar10-jpeg.tar.gz")
DEFAULT_RESULTS = os.path.join(REPO, "docs", "results", "cifar10")
TRAIN_SPLIT = 50_000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default=None, choices=("tensorflow", "jax", "torch"))
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows, in order")
    parser.add_argument("--state", default=None, help="state folder (default: the cache, keyed by the budget)")
    parser.add_argument("--results", default=None,
                        help="folder of the finished rows' JSON ('': none; default: docs/results/cifar10 for the "
                             "default study, docs/results/cifar10/experiments/<changed settings> for any other)")
    parser.add_argument("--backbone", default="vit_tiny")
    parser.add_argument("--depth", type=int, default=4, help="encoder blocks (vit_tiny has 12)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--passes", type=float, default=5, help="passes over the whole training split")
    parser.add_argument("--segments", type=int, default=10, help="epochs the budget is cut into (refresh points)")
    parser.add_argument("--lr-frequency", type=float, default=1e-3, help="peak lr of mfm/sr/deblur/denoise")
    parser.add_argument("--lr-tokens", type=float, default=3e-3, help="peak lr of mae/amt/famt/simmim/simmim_famt")
    parser.add_argument("--radius", type=float, default=None, help="MFM radius (default 16/224 x size)")
    parser.add_argument("--decoder-dim", type=int, default=192)
    parser.add_argument("--decoder-depth", type=int, default=4)
    parser.add_argument("--decoder-heads", type=int, default=3)
    parser.add_argument("--refresh-warmup", type=int, default=1, help="segments before the first refresh")
    parser.add_argument("--refresh-interval", type=int, default=1, help="segments between refreshes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=10_000, help="k-NN bank / probe / fine-tune subset")
    parser.add_argument("--test-images", type=int, default=0, help="test subset (0: all)")
    parser.add_argument("--probe-epochs", type=int, default=90)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--no-curves", action="store_true", help="no snapshots / learning curves")
    parser.add_argument("--holdout", type=int, default=0, help="tuning: hold out N training images as queries")
    parser.add_argument("--images", type=int, default=0,
                        help="smoke tests: a seeded subset of N training and N test images (0: all)")
    parser.add_argument("--plot", default=None, help="PNG of the k-NN learning curves against CPU time")
    parser.add_argument("--verbose", type=int, default=2)
    parser.add_argument("--experiments", action="store_true",
                        help="print the table of every published experiment (docs/results/cifar10/experiments), "
                             "then exit")
    parser.add_argument("--threads", type=int, default=0,
                        help="PyTorch intra-op threads (0: PyTorch's default; 1 on a shared machine)")
    args = parser.parse_args(argv)
    if args.results is None:
        args.results = default_results(args, parser)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    return args


# Settings that do not change a row's numbers (where it runs, what it reports).
_NEUTRAL_SETTINGS = ("rows", "threads", "data", "plot", "verbose", "state", "results", "experiments")
# ... nor, for naming an experiment, the backend (recorded in each row) or whether curves are drawn.
_REPORTING_SETTINGS = _NEUTRAL_SETTINGS + ("backend", "no_curves")


def experiment_name(args, parser):
    """The settings that differ from the study's defaults, as a folder name ('' for the default
    study), e.g. `passes2-radius4-holdout5000`; another data set than the default's archive adds
    `data-<its name>`."""
    parts = []
    for key, value in vars(args).items():
        if key in _REPORTING_SETTINGS or value == parser.get_default(key):
            continue
        parts.append(key.replace("_", "-") + (f"{value:g}" if isinstance(value, float) else str(value)))
    name = os.path.basename(os.path.normpath(str(args.data)))
    if name != os.path.basename(DEFAULT_DATA):
        parts.append("data-" + "".join(c if c.isalnum() or c in "._" else "_" for c in name))
    return "-".join(parts)


def default_results(args, parser):
    """Where finished rows are published: `docs/results/cifar10/` for the default study, a folder of
    their own under `experiments/` for any other settings, so that a held-out or longer run never
    replaces a row of the study."""
    name = experiment_name(args, parser)
    return os.path.join(DEFAULT_RESULTS, "experiments", name) if name else DEFAULT_RESULTS


def set_threads(threads):
    import keras

    if threads and keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(threads)


# -- data ----------------------------------------------------------------------------------------
def _link_split(pairs, destination):
    for path, class_name in pairs:
        folder = os.path.join(destination, class_name)
        os.makedirs(folder, exist_ok=True)
        os.symlink(os.path.abspath(path), os.path.join(folder, os.path.basename(path)))


def _linked_folder(name, build):
    """A cached image folder of symlinks made once (atomically) by `build(staging_dir)`."""
    from keras_mfm import data

    target = os.path.join(data.cache_dir(), "benchmarks", name)
    if not os.path.isdir(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        import tempfile

        staging = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(target))
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process made it first
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return target


def _root_key(root, *values):
    return hashlib.sha256(repr((os.path.realpath(root),) + values).encode()).hexdigest()[:12]


def holdout_folder(spec, holdout, seed=0):
    """Tuning data: an image folder whose `train/` is the training split minus a seeded `holdout`-image
    part and whose `test/` is that part (symlinks in the cache; the real test split is not used).

    Returns the folder (a `--data` spec for `pretrain` and the evaluation protocols).
    """
    import numpy as np

    from keras_mfm import data

    root = data.resolve_data(spec).root
    if root is None:
        raise data.DataError("--holdout needs an image folder or archive, not a TFDS data set.")
    paths, labels, class_names = data.list_image_folder(os.path.join(root, "train"))
    if not 0 < holdout < len(paths):
        raise data.DataError(f"--holdout must be in [1, {len(paths) - 1}], got {holdout}.")
    held = set(np.random.default_rng(seed).choice(len(paths), size=holdout, replace=False).tolist())

    def build(staging):
        pairs = [(p, class_names[label]) for p, label in zip(paths, labels)]
        _link_split([pair for i, pair in enumerate(pairs) if i not in held], os.path.join(staging, "train"))
        _link_split([pair for i, pair in enumerate(pairs) if i in held], os.path.join(staging, "test"))

    return _linked_folder(f"holdout-{holdout}-seed{seed}-{_root_key(root, holdout, seed)}", build)


def subset_folder(spec, images, seed=0):
    """A seeded `images`-image subset of each split as a cached image folder (smoke tests)."""
    from keras_mfm import data

    root = data.resolve_data(spec).root

    def build(staging):
        for split in data.SPLITS:
            paths, labels, class_names = data.list_image_folder(os.path.join(root, split))
            keep = data._subset(len(paths), min(images, len(paths)), seed)
            _link_split([(paths[i], class_names[labels[i]]) for i in keep], os.path.join(staging, split))

    return _linked_folder(f"subset-{images}-seed{seed}-{_root_key(root, images, seed)}", build)


def pretraining_folder(spec, images, seed=0):
    """A seeded `images`-image subset of the training split as a cached image folder (`train/` only):
    the same images as `data.load_split(spec, "train", limit=images, seed=seed)` (the evaluation subset)."""
    from keras_mfm import data

    root = data.resolve_data(spec).root
    if root is None:
        raise data.DataError("--pretrain-images needs an image folder or archive, not a TFDS data set.")
    paths, labels, class_names = data.list_image_folder(os.path.join(root, "train"))
    keep = data._subset(len(paths), min(images, len(paths)), seed)

    def build(staging):
        _link_split([(paths[i], class_names[labels[i]]) for i in keep], os.path.join(staging, "train"))

    return _linked_folder(f"pretrain-{images}-seed{seed}-{_root_key(root, images, seed)}", build)


# -- baselines -----------------------------------------------------------------------------------
def raw_pixel_baseline(train, test, probe_epochs=90, batch_size=256, seed=0, k=20, temperature=0.07):
    """k-NN and MAE's linear probe (the same head and LARS recipe) on flattened pixels.

    `train`, `test`: `evaluation.Features` whose features are the images flattened (N, H*W*3).
    """
    import keras

    from keras_mfm import evaluation
    from keras_mfm.models.classifier import build_head

    keras.utils.set_random_seed(seed)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    head = build_head("linear_probe", num_classes)
    lr = evaluation.train_linear_head(head, train, probe_epochs, batch_size, seed=seed)
    logits = keras.ops.convert_to_numpy(head(test.features, training=False))
    train_logits = keras.ops.convert_to_numpy(head(train.features, training=False))
    return {
        "knn_top1": evaluation.knn_accuracy(train, test, k, temperature),
        "linear_top1": evaluation.top1(logits, test.labels),
        "linear": {"train_top1": evaluation.top1(train_logits, train.labels), "lr": lr, "epochs": probe_epochs},
        "train_images": int(len(train.labels)), "test_images": int(len(test.labels)),
    }


def pixel_features(source, image_size, train_images, test_images, seed=0):
    """Flattened pixels (in [0, 1]) of the evaluation subsets, as `evaluation.Features`."""
    import numpy as np

    from keras_mfm import evaluation

    splits = evaluation.load_evaluation_data(source, train_images, test_images, seed)
    result = []
    for dataset in splits.datasets((image_size, image_size), 512):
        images, labels = [], []
        for batch_images, batch_labels in dataset:
            images.append(np.asarray(batch_images).reshape(len(batch_labels), -1))
            labels.append(np.asarray(batch_labels))
        result.append(evaluation.Features(np.concatenate(images).astype("float32"),
                                          np.concatenate(labels).astype("int64")))
    return result


# -- rows ----------------------------------------------------------------------------------------
def method_lr(args, method):
    return args.lr_frequency if method in FREQUENCY_FAMILY else args.lr_tokens


def budget(args, train_images):
    """`(epochs, steps per epoch)`: `--passes` over `train_images`, cut into `--segments` epochs."""
    total = int(args.passes * train_images) // args.batch_size
    steps = max(1, total // args.segments)
    return args.segments, steps


def budget_key(args):
    keys = ("backbone", "depth", "image_size", "patch_size", "batch_size", "passes", "segments", "lr_frequency",
            "lr_tokens", "radius", "decoder_dim", "decoder_depth", "decoder_heads", "refresh_warmup",
            "refresh_interval", "seed", "train_images", "test_images", "probe_epochs", "finetune_epochs", "holdout",
            "images", "data")
    text = json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True)
    return f"p{args.passes:g}-d{args.depth}-" + hashlib.sha256(text.encode()).hexdigest()[:10]


def row_method(row):
    """`(method, overrides)` of a row: the method it trains and the settings it changes."""
    if row == "mae_throw":
        from keras_mfm.methods import DEFAULT_RATIOS

        mask_ratio, throw_ratio = DEFAULT_RATIOS["famt"]
        return "mae", {"mask_ratio": mask_ratio, "throw_ratio": throw_ratio}
    return row, {}


def pretrain_config(args, row, data_spec, output, train_images):
    from keras_mfm import training

    epochs, steps = budget(args, train_images)
    method, overrides = row_method(row)
    return training.PretrainConfig(
        **overrides, method=method, backbone=args.backbone, image_size=args.image_size, patch_size=args.patch_size,
        depth=args.depth, data=data_spec, epochs=epochs, steps_per_epoch=steps, batch_size=args.batch_size,
        lr=method_lr(args, method), radius=args.radius, decoder_dim=args.decoder_dim,
        decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads, refresh_warmup=args.refresh_warmup,
        refresh_interval=args.refresh_interval, seed=args.seed, output=output, eval="none", verbose=args.verbose,
    )


def _read_json(path, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as handle:
        return json.load(handle)


def _write_json(path, value):
    from keras_mfm.checkpoints import write_json_atomically

    write_json_atomically(path, value)


def cpu_ledger(row_dir):
    """A row's CPU seconds so far (pre-training, summed over resumed runs)."""
    return float(_read_json(os.path.join(row_dir, "cpu.json"), {"cpu_seconds": 0.0})["cpu_seconds"])


def _callbacks(row_dir, total_steps, curves):
    """Keras callbacks of a row's pre-training: the CPU ledger at each epoch end, and encoder
    snapshots after 1/8, 1/4, 1/2 of the budget (each with the CPU time spent until then)."""
    import keras

    base, start = cpu_ledger(row_dir), time.process_time()
    targets = {}  # step -> the fractions that end there (a short run can put two on one step)
    for fraction in CURVE_FRACTIONS if curves else ():
        targets.setdefault(max(1, int(round(fraction * total_steps))), []).append(fraction)

    def spent():
        return base + time.process_time() - start

    class Ledger(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            for fraction in targets.get(step, ()):
                path = os.path.join(row_dir, f"snapshot_{fraction}.keras")
                if not os.path.isfile(path):
                    from keras_mfm.checkpoints import save_atomically

                    save_atomically(self.model.encoder, path)
                    _write_json(path + ".json", {"fraction": fraction, "step": step, "cpu_seconds": spent()})

        def on_epoch_end(self, epoch, logs=None):
            _write_json(os.path.join(row_dir, "cpu.json"), {"cpu_seconds": spent(), "epochs": epoch + 1})

    return [Ledger()]


def pretrain_row(args, method, data_spec, row_dir, train_images):
    """Pre-trains (or resumes, or reloads) `method`; returns (encoder, pre-training info)."""
    import keras

    from keras_mfm import training

    run_dir = os.path.join(row_dir, "run")
    info_path = os.path.join(row_dir, "pretrain.json")
    info = _read_json(info_path)
    if info and os.path.isfile(os.path.join(run_dir, training.ENCODER)):
        return keras.saving.load_model(os.path.join(run_dir, training.ENCODER)), info
    config = pretrain_config(args, method, data_spec, run_dir, train_images)
    callbacks = _callbacks(row_dir, config.epochs * config.steps_per_epoch, not args.no_curves)
    start = time.perf_counter()
    if os.path.isfile(os.path.join(run_dir, training.CHECKPOINT)):
        print(f"[{method}] resuming the pre-training in {run_dir}", flush=True)
        run = training.resume(run_dir, callbacks=callbacks)
    else:
        run = training.pretrain(config, callbacks=callbacks, overwrite=True)  # no checkpoint: nothing to keep
    run_info = run["info"]
    refreshes = run_info.get("importance_refreshes", [])
    info = {
        "cpu_seconds": cpu_ledger(row_dir),  # CPU time of the pre-training, summed over resumed runs
        "wall_seconds_last_run": time.perf_counter() - start,
        "refresh_seconds": float(sum(r["seconds"] for r in refreshes)),  # wall time of the refreshes
        "fit_seconds": run_info["pretrain_seconds"],
        "refreshes": refreshes,
        "final_loss": run_info["final_loss"],
        "steps": config.epochs * config.steps_per_epoch,
        "passes": args.passes,
        "lr": config.lr,
        "recipe": run_info.get("recipe"),
        "init": run_info.get("init"),
        "encoder_parameters": run_info["encoder_parameters"],
    }
    _write_json(info_path, info)
    return run["model"].encoder, info


def random_encoder(args):
    import keras

    from keras_mfm import training

    keras.utils.set_random_seed(args.seed)
    config = pretrain_config(args, "mfm", None, None, TRAIN_SPLIT)  # MFM's ViT (learned positions, its init)
    return training.build_encoder(config)


def _part(row_dir, name, compute, current=None):
    """A row's evaluation part, computed once and kept (`row_dir/name.json`). A kept part that
    `current(value)` rejects is moved aside to `name.superseded.json` and computed again."""
    path = os.path.join(row_dir, f"{name}.json")
    value = _read_json(path)
    if value is not None and current is not None and not current(value):
        os.replace(path, os.path.join(row_dir, f"{name}.superseded.json"))
        value = None
    if value is None:
        start, cpu = time.perf_counter(), time.process_time()
        value = dict(compute())
        value["seconds"], value["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
        _write_json(path, value)
    return value


def frozen_protocols(args, encoder, data_spec, pooling, protocols=("knn", "linear"), train_images=None):
    from keras_mfm import evaluation

    result = evaluation.evaluate_frozen_on_data(
        encoder, data_spec, protocols, batch_size=256, train_images=train_images or args.train_images or None,
        test_images=args.test_images or None, seed=args.seed, probe_epochs=args.probe_epochs, pooling=pooling,
    )
    return {k: v for k, v in dict(result).items() if isinstance(v, (int, float, str, list))}


def _seeded_finetune(part):
    """A fine-tune part made from the seeded augmentation stream (`finetune_on_data(deterministic=True)`:
    the same batches on every run); one without that record is done again."""
    return part.get("deterministic") is True


def current_result(row, result):
    """A finished row is kept when its fine-tune is the seeded one (raw pixels have none); else the row
    is run again, which keeps its pre-training and frozen parts and redoes only the fine-tune."""
    return result is not None and (row == "pixels" or result.get("finetune_deterministic") is True)


def finetune_protocol(args, encoder, data_spec):
    from keras_mfm import evaluation

    result = evaluation.finetune_on_data(
        encoder, data_spec, batch_size=args.batch_size, train_images=args.train_images or None,
        test_images=args.test_images or None, seed=args.seed, epochs=args.finetune_epochs, warmup_epochs=1,
    )
    return {k: v for k, v in dict(result).items() if isinstance(v, (int, float, str, list))}


def curve_points(args, row_dir, data_spec, final_cpu, final_knn):
    """k-NN of every snapshot (and the end), `[{fraction, cpu_minutes, knn_cls, knn_mean}]`."""
    import keras

    points = []
    for fraction in CURVE_FRACTIONS:
        path = os.path.join(row_dir, f"snapshot_{fraction}.keras")
        if not os.path.isfile(path):
            continue
        meta = _read_json(path + ".json")

        def score(path=path):
            encoder = keras.saving.load_model(path)
            return {pooling: frozen_protocols(args, encoder, data_spec, pooling, ("knn",))["knn_top1"]
                    for pooling in ("cls", "mean")}

        knn = _part(row_dir, f"curve_{fraction}", score)
        points.append({"fraction": fraction, "cpu_minutes": meta["cpu_seconds"] / 60, "knn_cls": knn["cls"],
                       "knn_mean": knn["mean"]})
    points.append({"fraction": 1.0, "cpu_minutes": final_cpu / 60, **final_knn})
    return points


def run_row(args, row, data_spec):
    """Every part of one row (each kept when done); returns its result dict."""
    import keras

    from keras_mfm import data

    row_dir = os.path.join(args.state, row)
    os.makedirs(row_dir, exist_ok=True)
    result = {"row": row, "method": row, "backend": keras.backend.backend(), "data": data_spec}
    train_images = data.load_split(data.resolve_data(data_spec), "train").num_examples
    epochs, steps = budget(args, train_images)
    result["budget"] = {"passes": args.passes, "steps": epochs * steps, "batch_size": args.batch_size,
                        "train_images": train_images, "depth": args.depth}
    if row == "pixels":
        def pixels():
            train, test = pixel_features(data_spec, args.image_size, args.train_images or None,
                                         args.test_images or None, args.seed)
            return raw_pixel_baseline(train, test, args.probe_epochs, seed=args.seed)

        evaluation = _part(row_dir, "pixels", pixels)
        result.update(knn_cls=evaluation["knn_top1"], knn_mean=None, linear_cls=evaluation["linear_top1"],
                      linear_mean=None, finetune=None, cpu_minutes=0.0, curve=[])
        result["eval_cpu_minutes"] = evaluation["cpu_seconds"] / 60
        return result
    if row == "random":
        encoder, info = random_encoder(args), None
        cpu = 0.0
    else:
        encoder, info = pretrain_row(args, row, data_spec, row_dir, train_images)
        cpu = info["cpu_seconds"]
    frozen = {pooling: _part(row_dir, f"frozen_{pooling}",
                             lambda p=pooling: frozen_protocols(args, encoder, data_spec, p))
              for pooling in ("cls", "mean")}
    tuned = _part(row_dir, "finetune", lambda: finetune_protocol(args, encoder, data_spec), current=_seeded_finetune)
    result.update(
        knn_cls=frozen["cls"]["knn_top1"], knn_mean=frozen["mean"]["knn_top1"],
        linear_cls=frozen["cls"]["linear_top1"], linear_mean=frozen["mean"]["linear_top1"],
        finetune=tuned["finetune_top1"], cpu_minutes=cpu / 60, pretrain=info,
        finetune_deterministic=_seeded_finetune(tuned),
    )
    result["eval_cpu_minutes"] = sum(part["cpu_seconds"] for part in (*frozen.values(), tuned)) / 60
    final = {"knn_cls": result["knn_cls"], "knn_mean": result["knn_mean"]}
    result["curve"] = [] if row == "random" else curve_points(args, row_dir, data_spec, cpu, final)
    if info:
        result["refresh_minutes"] = info["refresh_seconds"] / 60
    return result


def published_result(args, row):
    """The row's committed `--results/<row>.json` when it was made with the same settings (budget,
    model, protocols, seed, backend, data file), so that a fresh machine does not redo it; else None."""
    if not args.results:
        return None
    public = _read_json(os.path.join(args.results, f"{row}.json"))
    if not public or not public.get("settings"):
        return None
    ours = {k: v for k, v in vars(args).items() if k not in _NEUTRAL_SETTINGS}
    theirs = {k: v for k, v in public["settings"].items() if k not in _NEUTRAL_SETTINGS}
    same_data = os.path.basename(str(public["settings"].get("data"))) == os.path.basename(str(args.data))
    if ours != theirs or not same_data:
        return None
    return dict(public, row=row, published=True)


def rows_of(args):
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for name in rows:
        if name not in ROWS + ABLATIONS:
            raise SystemExit(f"accuracy.py: unknown row {name!r}; choose from {', '.join(ROWS + ABLATIONS)}.")
    return rows


def _cell(value, digits=2):
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(results, pending=()):
    """One line per finished row; the pending rows named below the table."""
    lines = [
        "| row | passes (steps) | pre-training CPU min (refresh wall min) | k-NN [CLS] | k-NN mean | linear [CLS] "
        "| linear mean | fine-tune | eval CPU min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        row = r.get("method", key)
        name = {"random": "random init", "pixels": "raw pixels"}.get(key, key)
        steps = f"{r['budget']['passes']:g} ({r['budget']['steps']})" if row not in BASELINES else "none"
        cpu = "none" if row in BASELINES else _cell(r["cpu_minutes"], 1)
        if r.get("refresh_minutes"):
            cpu += f" ({r['refresh_minutes']:.1f})"
        lines.append(f"| {name} | {steps} | {cpu} | {_cell(r['knn_cls'])} | {_cell(r['knn_mean'])} "
                     f"| {_cell(r['linear_cls'])} | {_cell(r['linear_mean'])} | {_cell(r['finetune'])} "
                     f"| {_cell(r.get('eval_cpu_minutes'), 1)} |")
    if pending:
        lines.append("")
        lines.append(f"Pending rows: {', '.join(pending)}.")
    return "\n".join(lines)


def experiment_results(root=None):
    """Every published experiment row under `root` (default `docs/results/cifar10/experiments`:
    `<experiment>/<row>.json`), keyed `"<experiment>: <row>"`, experiments by name and rows in the
    study's order."""
    root = root or os.path.join(DEFAULT_RESULTS, "experiments")
    order = {row: i for i, row in enumerate(ROWS + ABLATIONS)}
    results = {}
    for experiment in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        folder = os.path.join(root, experiment)
        rows = [name[:-len(".json")] for name in os.listdir(folder) if name.endswith(".json")]
        for row in sorted(rows, key=lambda r: (order.get(r, len(order)), r)):
            results[f"{experiment}: {row}"] = _read_json(os.path.join(folder, f"{row}.json"))
    return results


def plot(results, path):
    """k-NN ([CLS] and mean-pooled) against pre-training CPU time for every method; random init
    and raw pixels as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharex=True)
    for ax, key, title in zip(axes, ("knn_cls", "knn_mean"), ("k-NN top-1, [CLS] (%)", "k-NN top-1, mean pooling (%)")):
        for row, r in results.items():
            if row in BASELINES or not r.get("curve"):
                continue
            xs, ys = [p["cpu_minutes"] for p in r["curve"]], [p[key] for p in r["curve"]]
            ax.plot(xs, ys, "-o", markersize=3, label=row)
        for row, style in (("random", "--"), ("pixels", ":")):
            value = results.get(row, {}).get(key) if row == "random" else results.get(row, {}).get("knn_cls")
            if value is not None:
                ax.axhline(value, color="0.3", linestyle=style, linewidth=1,
                           label={"random": "random init", "pixels": "raw pixels"}[row])
        ax.set_xlabel("pre-training time (CPU minutes, one thread)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.experiments:
        results = experiment_results()
        print(markdown_table(results) if results else "No experiment has been published.")
        return results
    from keras_mfm import data  # after the backend is chosen
    # every module a row uses, imported now: a run lasts hours, and a module first imported hours
    # later from an edited work tree would mix two versions of the library in one process
    import keras_mfm.evaluation  # noqa: F401
    import keras_mfm.importance  # noqa: F401
    import keras_mfm.training  # noqa: F401

    set_threads(args.threads)
    rows = rows_of(args)
    data_spec = args.data
    if args.images:
        data_spec = subset_folder(data_spec, args.images, args.seed)
    if args.holdout:
        data_spec = holdout_folder(data_spec, args.holdout, args.seed)
    args.state = os.path.expanduser(args.state or os.path.join(data.cache_dir(), "accuracy", budget_key(args)))
    os.makedirs(args.state, exist_ok=True)
    print(f"state: {args.state}", flush=True)
    for row in rows:
        path = os.path.join(args.state, row, "result.json")
        if current_result(row, _read_json(path)):
            print(f"[{row}] done already: {path}", flush=True)
            continue
        published = published_result(args, row)
        if current_result(row, published):
            print(f"[{row}] done already, same settings: {os.path.join(args.results, row + '.json')}", flush=True)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _write_json(path, published)
            continue
        print(f"[{row}] starting at {time.strftime('%H:%M:%S')}", flush=True)
        result = run_row(args, row, data_spec)
        result["settings"] = {k: v for k, v in vars(args).items() if k not in ("plot", "verbose", "state", "results")}
        _write_json(path, result)
        print(f"[{row}] k-NN {_cell(result['knn_cls'])} / {_cell(result['knn_mean'])}, linear "
              f"{_cell(result['linear_cls'])} / {_cell(result['linear_mean'])}, fine-tune {_cell(result['finetune'])}",
              flush=True)
    results = {row: _read_json(os.path.join(args.state, row, "result.json")) for row in rows}
    pending = [row for row, r in results.items() if not current_result(row, r)]
    results = {row: r for row, r in results.items() if current_result(row, r)}
    if args.results:
        os.makedirs(args.results, exist_ok=True)
        for row, r in results.items():
            public = {k: r[k] for k in ("method", "budget", "cpu_minutes", "knn_cls", "knn_mean", "linear_cls",
                                        "linear_mean", "finetune", "curve", "backend")}
            public["finetune_deterministic"] = r.get("finetune_deterministic")
            public["refresh_minutes"] = r.get("refresh_minutes")
            public["eval_cpu_minutes"] = r.get("eval_cpu_minutes")
            public["settings"] = r.get("settings")
            _write_json(os.path.join(args.results, f"{row}.json"), public)
    table = markdown_table(results, pending)
    print(table)
    with open(os.path.join(args.state, "table.md"), "w") as handle:
        handle.write(table + "\n")
    if args.plot:
        plot(results, args.plot)
    return results


SNAPSHOT_ENV = "KERAS_MFM_STUDY_SNAPSHOT"


def snapshot_code(state, repo=REPO):
    """A copy of the library and of this script under `state/code/<digest of their sources>/`
    (made once per version); returns the script's path there."""
    import shutil

    sources = [os.path.join(repo, "benchmarks", "accuracy.py")]
    for parent, folders, names in os.walk(os.path.join(repo, "keras_mfm")):
        folders[:] = sorted(f for f in folders if f != "__pycache__")
        sources += [os.path.join(parent, name) for name in sorted(names) if name.endswith(".py")]
    digest = hashlib.sha256()
    for path in sources:
        digest.update(os.path.relpath(path, repo).encode() + b"\0")
        with open(path, "rb") as handle:
            digest.update(handle.read())
    target = os.path.join(state, "code", digest.hexdigest()[:12])
    script = os.path.join(target, "benchmarks", "accuracy.py")
    if not os.path.isfile(script):
        # a temporary folder of this process's own: studies started together each copy, one wins
        temporary = f"{target}.tmp{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        for path in sources:
            copy = os.path.join(temporary, os.path.relpath(path, repo))
            os.makedirs(os.path.dirname(copy), exist_ok=True)
            shutil.copy2(path, copy)
        try:
            os.replace(temporary, target)
        except OSError:
            if not os.path.isfile(script):
                raise
            shutil.rmtree(temporary, ignore_errors=True)
    return script


def run_from_snapshot(argv):
    """Runs the study from `snapshot_code`'s copy, so that editing the work tree during a run of
    hours cannot reach it: TensorFlow's autograph reads a function's source from its file each time
    it traces it (every epoch's pipeline, each refresh), and a file edited meanwhile gives it the
    wrong source. The paths that default to the work tree (data, results, state) are passed on."""
    args = parse_args(argv)
    if os.environ.get(SNAPSHOT_ENV) or args.experiments:
        return main(argv)
    from keras_mfm import data

    state = os.path.expanduser(args.state or os.path.join(data.cache_dir(), "accuracy", budget_key(args)))
    script = snapshot_code(state)
    print(f"running from a copy of the library: {os.path.dirname(os.path.dirname(script))}", flush=True)
    passed = [*argv, "--data", args.data, "--results", args.results, "--state", state]
    os.execve(sys.executable, [sys.executable, script, *passed],
              dict(os.environ, **{SNAPSHOT_ENV: "1"}))


if __name__ == "__main__":
    run_from_snapshot(sys.argv[1:])
