#!/usr/bin/env python
"""Do the methods work? Every pre-training objective under one compute budget, scored by k-NN and
the linear probe on CIFAR-10, next to a random-init encoder and a raw-pixel linear classifier.

    python benchmarks/accuracy.py --backend torch --threads 1 --lr-frequency 1e-3 --lr-tokens 3e-3 \
        --output runs/accuracy --plot docs/accuracy_vs_time.png                    # the study
    python benchmarks/accuracy.py --backend torch --threads 1 --holdout 5000 --methods mfm,mae \
        --baselines none --epochs 2 --steps-per-epoch 20 --train-images 5000 --lr 1e-3 \
        --output runs/accuracy_tune/lr1e-3                                         # a tuning run

One architecture for every row: `--backbone vit_tiny` (192-d, 3 heads) with `--depth` blocks (4), patch
4 at 32x32 (64 tokens); MAE-family decoder `--decoder-dim/--decoder-depth/--decoder-heads` (192/4/3).
Every method gets the same budget: `--epochs` x `--steps-per-epoch` steps (4 x 25) of `--batch-size`
(128) images, the library's recipe (AdamW, warm-up + cosine), the same seed; the peak lr per family
(`--lr-frequency` for mfm/sr/deblur/denoise, `--lr-tokens` for the token-masking methods). Pre-training
reads a seeded `--pretrain-images` subset of the training split (10,000: with the same seed the very
images of the evaluation bank; 0 = the whole split). AMT/FAMT/SimMIM+FAMT refresh their importance
table at the start of epoch `--refresh-warmup` (1) and every `--refresh-interval` (2) epochs; each
refresh scores the whole pre-training split once and counts in the row's pre-training time.

Evaluation (the same for every row): frozen [CLS] features; k-NN (k 20, T 0.07) and MAE's linear
probe (LARS, 90 epochs); bank / probe training set a seeded `--train-images` subset of the training
split, queries all test images (`--test-images 0`). The raw-pixel row runs the same k-NN and the same
probe head (BatchNorm without affine + linear, LARS) on the flattened 32x32x3 pixels.

Tuning without the test split: `--holdout N` holds out a seeded N-image part of the training split
(an image folder of symlinks in the cache, `train/` = the rest, `test/` = the held-out part), pre-trains
on (a subset of) the rest and scores with a `--train-images` bank from the rest and the held-out images
as queries.

Times: wall time and the process's CPU time (with `--threads 1` a run's CPU time is its time alone on
one core, whatever else the machine runs). Resuming: each row writes `OUTPUT/<row>/result.json`
(pre-training in `OUTPUT/<row>/run/`, its times in `OUTPUT/<row>/pretrain.json`) and finished rows are
skipped; an interrupted pre-training continues from its checkpoint (`keras_mfm.training.resume`).
Prints a markdown table (also `OUTPUT/table.md`) and, with `--plot`, accuracy against pre-training time.
"""

import argparse
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("mfm", "sr", "deblur", "denoise", "mae", "amt", "famt", "simmim", "simmim_famt")
BASELINES = ("random", "pixels")
FREQUENCY_FAMILY = ("mfm", "sr", "deblur", "denoise")  # the MFM model (encoder + pixel-shuffle head)
RESULT = "result.json"
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                            "cifar10-jpeg.tar.gz")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default=None, choices=("tensorflow", "jax", "torch"))
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--output", default="runs/accuracy")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated pre-training methods")
    parser.add_argument("--baselines", default=",".join(BASELINES), help="random,pixels or none")
    parser.add_argument("--backbone", default="vit_tiny")
    parser.add_argument("--depth", type=int, default=4, help="encoder blocks (vit_tiny has 12)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps-per-epoch", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-3, help="absolute peak lr of every method")
    parser.add_argument("--lr-frequency", type=float, default=None, help="lr of mfm/sr/deblur/denoise (default --lr)")
    parser.add_argument("--lr-tokens", type=float, default=None,
                        help="lr of mae/amt/famt/simmim/simmim_famt (default --lr)")
    parser.add_argument("--warmup-epochs", type=float, default=None, help="lr warm-up (default 1/15 of the run)")
    parser.add_argument("--decoder-dim", type=int, default=192)
    parser.add_argument("--decoder-depth", type=int, default=4)
    parser.add_argument("--decoder-heads", type=int, default=3)
    parser.add_argument("--refresh-warmup", type=int, default=1)
    parser.add_argument("--refresh-interval", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=10_000, help="k-NN bank / probe training subset")
    parser.add_argument("--test-images", type=int, default=0, help="test subset (0: all)")
    parser.add_argument("--probe-epochs", type=int, default=90)
    parser.add_argument("--holdout", type=int, default=0, help="tuning: hold out N training images as queries")
    parser.add_argument("--pretrain-images", type=int, default=10_000,
                        help="pre-train on a seeded subset of N training images (0: the whole split); with the "
                             "same --seed and N = --train-images it is the k-NN bank / probe training subset")
    parser.add_argument("--images", type=int, default=0,
                        help="smoke tests: use a seeded subset of N training and N test images (0: all)")
    parser.add_argument("--plot", default=None, help="PNG of accuracy against pre-training time (MAE vs FAMT)")
    parser.add_argument("--curve-from", nargs="*", default=(),
                        help="output folders of shorter budgets whose mae/famt rows add points to the plot's curves")
    parser.add_argument("--verbose", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="PyTorch intra-op threads (0: PyTorch's default; 1 avoids oversubscription on a "
                             "shared machine)")
    args = parser.parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    return args


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
    specific = args.lr_frequency if method in FREQUENCY_FAMILY else args.lr_tokens
    return args.lr if specific is None else specific


def pretrain_config(args, method, data_spec, output):
    from keras_mfm import training

    return training.PretrainConfig(
        method=method, backbone=args.backbone, image_size=args.image_size, patch_size=args.patch_size,
        depth=args.depth, data=data_spec, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size, lr=method_lr(args, method), warmup_epochs=args.warmup_epochs,
        decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
        refresh_warmup=args.refresh_warmup, refresh_interval=args.refresh_interval, seed=args.seed,
        output=output, eval="none", verbose=args.verbose,
    )


def pretrain_row(args, method, data_spec, row_dir):
    """Pre-trains (or resumes, or reloads) `method`; returns (encoder, pre-training info)."""
    import keras

    from keras_mfm import training

    run_dir = os.path.join(row_dir, "run")
    info_path = os.path.join(row_dir, "pretrain.json")
    if os.path.isfile(info_path) and os.path.isfile(os.path.join(run_dir, training.ENCODER)):
        with open(info_path) as handle:
            info = json.load(handle)
        return keras.saving.load_model(os.path.join(run_dir, training.ENCODER)), info
    resumed = os.path.isfile(os.path.join(run_dir, "config.json")) and os.path.isfile(
        os.path.join(run_dir, training.CHECKPOINT))
    start, cpu = time.perf_counter(), time.process_time()
    if resumed:
        print(f"[{method}] resuming the pre-training in {run_dir}", flush=True)
        run = training.resume(run_dir)
    else:
        run = training.pretrain(pretrain_config(args, method, data_spec, run_dir))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    run_info = run["info"]
    refreshes = run_info.get("importance_refreshes", [])
    refresh_seconds = float(sum(r["seconds"] for r in refreshes))
    info = {
        "pretrain_wall_seconds": wall,  # the whole call: data loading, model building, fit, saving
        "pretrain_cpu_seconds": cpu,  # CPU time of this process (all its threads): robust to a shared machine
        "fit_seconds": run_info["pretrain_seconds"],  # the epochs' loop, refreshes included
        "refresh_seconds": refresh_seconds,
        "fit_seconds_without_refresh": run_info["pretrain_seconds"] - refresh_seconds,
        "refreshes": refreshes,
        "final_loss": run_info["final_loss"],
        "steps": run_info["steps_per_epoch"] * run_info["config"]["epochs"],
        "lr": run_info["config"]["lr"],
        "encoder_parameters": run_info["encoder_parameters"],
        "resumed": resumed,  # wall times then cover the resumed part only
    }
    training.write_json_atomically(info_path, info)
    return run["model"].encoder, info


def random_encoder(args):
    import keras

    from keras_mfm import training

    keras.utils.set_random_seed(args.seed)
    return training.build_encoder(pretrain_config(args, "mfm", None, None))


def evaluate_encoder(args, encoder, data_spec):
    from keras_mfm import evaluation

    result = evaluation.evaluate_frozen_on_data(
        encoder, data_spec, ("knn", "linear"), batch_size=256, train_images=args.train_images or None,
        test_images=args.test_images or None, seed=args.seed, probe_epochs=args.probe_epochs,
    )
    return dict(result)


def run_row(args, row, data_spec, pretrain_spec=None):
    row_dir = os.path.join(args.output, row)
    os.makedirs(row_dir, exist_ok=True)
    result = {"row": row, "backend": None, "data": data_spec, "pretrain_data": pretrain_spec or data_spec}
    import keras

    result["backend"] = keras.backend.backend()
    if row == "pixels":
        start, cpu = time.perf_counter(), time.process_time()
        train, test = pixel_features(data_spec, args.image_size, args.train_images or None,
                                     args.test_images or None, args.seed)
        result["evaluation"] = raw_pixel_baseline(train, test, args.probe_epochs, seed=args.seed)
        result["eval_seconds"] = time.perf_counter() - start
        result["eval_cpu_seconds"] = time.process_time() - cpu
        return result
    if row == "random":
        encoder, info = random_encoder(args), None
    else:
        encoder, info = pretrain_row(args, row, pretrain_spec or data_spec, row_dir)
    result["pretrain"] = info
    start, cpu = time.perf_counter(), time.process_time()
    result["evaluation"] = evaluate_encoder(args, encoder, data_spec)
    result["eval_seconds"] = time.perf_counter() - start
    result["eval_cpu_seconds"] = time.process_time() - cpu
    return result


def rows_of(args):
    rows = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "none"]
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip() and b.strip() != "none"]
    for name in rows:
        if name not in METHODS:
            raise SystemExit(f"accuracy.py: unknown method {name!r}; choose from {', '.join(METHODS)}.")
    for name in baselines:
        if name not in BASELINES:
            raise SystemExit(f"accuracy.py: unknown baseline {name!r}; choose from {', '.join(BASELINES)}.")
    return baselines + rows


def load_results(output, rows):
    results = {}
    for row in rows:
        path = os.path.join(output, row, RESULT)
        if os.path.isfile(path):
            with open(path) as handle:
                results[row] = json.load(handle)
    return results


def _minutes(seconds):
    return "" if seconds is None else f"{seconds / 60:.1f}"


def markdown_table(results):
    """One line per row. Times in minutes: CPU time of the (single-threaded) process, robust to other
    jobs on the machine, and wall time (with the importance refreshes' share in brackets)."""
    lines = [
        "| row | pre-training CPU min | pre-training wall min (refresh) | loss | k-NN top-1 | linear top-1 "
        "| eval CPU min (wall) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, result in results.items():
        info, metrics = result.get("pretrain"), result["evaluation"]
        if info:
            cpu = _minutes(info.get("pretrain_cpu_seconds"))
            wall = _minutes(info["pretrain_wall_seconds"])
            if info["refresh_seconds"]:
                wall += f" ({_minutes(info['refresh_seconds'])})"
            loss = f"{info['final_loss']:.4f}"
        else:
            cpu, wall, loss = "none", "none", ""
        name = {"random": "random init", "pixels": "raw pixels"}.get(row, row)
        evaluation = f"{_minutes(result.get('eval_cpu_seconds'))} ({_minutes(result['eval_seconds'])})".strip()
        lines.append(f"| {name} | {cpu} | {wall} | {loss} | {metrics['knn_top1']:.2f} | {metrics['linear_top1']:.2f} "
                     f"| {evaluation} |")
    return "\n".join(lines)


def pretrain_minutes(info):
    """Pre-training time in minutes: CPU time when recorded (a single-threaded run's time alone on a
    core, robust to other jobs), else wall time; and the same without the importance refreshes
    (their share of the CPU time taken as their share of the wall time)."""
    total = info.get("pretrain_cpu_seconds") or info["pretrain_wall_seconds"]
    share = info["refresh_seconds"] / info["pretrain_wall_seconds"] if info["pretrain_wall_seconds"] else 0.0
    return total / 60, total * (1 - share) / 60


def plot(results, path, curves=()):
    """Accuracy against pre-training time: every method (grey), MAE and FAMT highlighted (from the
    random-init encoder at time 0, through the same rows of the shorter budgets in `curves`, a list of
    result dicts), also without their refreshes; random init and raw pixels as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    base = results.get("random")
    for ax, metric, title in zip(axes, ("knn_top1", "linear_top1"), ("k-NN top-1 (%)", "linear probe top-1 (%)")):
        for row, result in results.items():
            info = result.get("pretrain")
            if not info:
                continue
            minutes, without_refresh = pretrain_minutes(info)
            value = result["evaluation"][metric]
            if row in ("mae", "famt"):
                color = "tab:blue" if row == "mae" else "tab:red"
                points = sorted([pretrain_minutes(other[row]["pretrain"]) + (other[row]["evaluation"][metric],)
                                 for other in curves if row in other] + [(minutes, without_refresh, value)])
                xs, ys = [p[0] for p in points], [p[2] for p in points]
                if base:
                    xs, ys = [0.0] + xs, [base["evaluation"][metric]] + ys
                ax.plot(xs, ys, "-o", color=color, label=row.upper(), zorder=3)
                if info["refresh_seconds"]:
                    ax.plot([p[1] for p in points], [p[2] for p in points], "x", color=color,
                            label=f"{row.upper()} without the refreshes", zorder=3)
            else:
                ax.plot([minutes], [value], "o", color="0.6", zorder=2)
                ax.annotate(row, (minutes, value), fontsize=7, color="0.4", xytext=(3, 2),
                            textcoords="offset points")
        for row, style in (("random", "--"), ("pixels", ":")):
            if row in results:
                ax.axhline(results[row]["evaluation"][metric], color="0.3", linestyle=style, linewidth=1,
                           label={"random": "random init", "pixels": "raw pixels"}[row])
        ax.set_xlabel("pre-training time (CPU minutes, one thread)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    from keras_mfm import training  # after the backend is chosen

    set_threads(args.threads)
    rows = rows_of(args)
    data_spec = args.data
    if args.images:
        data_spec = subset_folder(data_spec, args.images, args.seed)
    if args.holdout:
        data_spec = holdout_folder(data_spec, args.holdout, args.seed)
    pretrain_spec = data_spec
    if args.pretrain_images:
        pretrain_spec = pretraining_folder(data_spec, args.pretrain_images, args.seed)
    os.makedirs(args.output, exist_ok=True)
    for row in rows:
        path = os.path.join(args.output, row, RESULT)
        if os.path.isfile(path):
            print(f"[{row}] done already: {path}", flush=True)
            continue
        print(f"[{row}] starting at {time.strftime('%H:%M:%S')}", flush=True)
        result = run_row(args, row, data_spec, pretrain_spec)
        result["settings"] = {k: v for k, v in vars(args).items() if k not in ("plot", "verbose")}
        training.write_json_atomically(path, result)
        metrics = result["evaluation"]
        print(f"[{row}] k-NN {metrics['knn_top1']:.2f} %, linear {metrics['linear_top1']:.2f} %, "
              f"eval {result['eval_seconds']:.0f} s", flush=True)
    results = load_results(args.output, rows)
    table = markdown_table(results)
    print(table)
    with open(os.path.join(args.output, "table.md"), "w") as handle:
        handle.write(table + "\n")
    if args.plot:
        plot(results, args.plot, [load_results(folder, ("mae", "famt")) for folder in args.curve_from])
    return results


if __name__ == "__main__":
    main()
