#!/usr/bin/env python
"""Score a pre-trained encoder (an encoder.keras written by train.py, or any Keras model from images
to features), or look at a run (`keras-mfm-eval`, `python eval.py`).

    python eval.py linear     --encoder runs/mfm/encoder.keras --data ../shared/data/cifar10-jpeg.tar.gz
    python eval.py knn        --encoder runs/mfm/encoder.keras --data ../shared/data/cifar10-jpeg.tar.gz
    python eval.py finetune   --encoder runs/mfm/encoder.keras --data ... --epochs 100 --save-classifier ft.keras
    python eval.py robustness --classifier ft.keras --data ...
    python eval.py show       --run runs/mfm --data ../shared/data/cifar10-jpeg.tar.gz --output runs/mfm/figures

Sub-commands:
  linear      BatchNorm (no affine) + linear head on frozen features, LARS, 90 epochs, peak lr 6.4 (MAE)
  knn         weighted k-NN on L2-normalised features, k=20, T=0.07 (DINO)
  finetune    end to end: AdamW, layer-wise lr decay 0.8, drop path 0.1, label smoothing 0.1,
              RandAugment m9, RandomErasing 0.25, MixUp 0.8 / CutMix 1.0 (SPEC.md recipe)
  robustness  top-1 under corruptions (noise, blur, JPEG, contrast, low/high-pass) at severities
              1-5, and under FGSM; of a --classifier, or of a linear probe trained on --encoder
  show        figures of a pre-training run (its checkpoint.keras, the whole model):
              reconstruction.png (what the model makes of a few test images), history.png
              (loss, lr, images/s from history.csv) and corruptions.png (every corruption)

`--random-init BACKBONE` evaluates a freshly initialised encoder instead: the baseline.
Each scoring sub-command prints a one-line summary and, with --output, writes the metrics as JSON;
`show` writes its PNGs into the --output directory and prints their paths.
"""

import argparse
import fractions
import os
import sys

from keras_mfm import cli
from keras_mfm.cli import BACKENDS

MODULE = "keras_mfm.cli.evaluate"


def _floats(text):
    """'1/255,2/255' -> [0.0039.., 0.0078..]."""
    try:
        return [float(fractions.Fraction(part)) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers or fractions, got {text!r}") from error


def _ints(text):
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("encoder and data")
    group.add_argument("--encoder", help="encoder.keras from train.py")
    group.add_argument("--random-init", metavar="BACKBONE",
                       help="evaluate a freshly initialised encoder of this preset instead (the baseline)")
    group.add_argument("--patch-size", type=int, default=4, help="patch size for --random-init ViTs")
    group.add_argument("--depth", type=int, default=None, help="number of blocks for --random-init ViTs")
    group.add_argument("--data", required=True, help="image folder, .tar.gz of one, or tfds:NAME")
    group.add_argument("--image-size", type=int, default=None,
                       help="must match the encoder's (default: the encoder's; 32 for --random-init)")
    group.add_argument("--batch-size", type=cli.positive_int, default=256,
                       help="batch size (feature extraction / training)")
    group.add_argument("--train-images", type=int, default=0, help="seeded subset of the training split (0: all)")
    group.add_argument("--test-images", type=int, default=0, help="seeded subset of the test split (0: all)")
    group.add_argument("--skip-unreadable", action="store_true",
                       help="leave out image files that cannot be decoded, with a count (each image is decoded "
                       "once first)")
    group.add_argument("--output", default=None, help="write the metrics as JSON here")
    group.add_argument("--backend", choices=BACKENDS, default=None, help="Keras backend")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--verbose", action="store_true", help="progress bars")

    commands = parser.add_subparsers(dest="command", required=True)
    formatter = argparse.ArgumentDefaultsHelpFormatter

    knn = commands.add_parser("knn", parents=[common], formatter_class=formatter,
                              help="weighted k-NN top-1 (frozen encoder)")
    knn.add_argument("--k", type=cli.positive_int, default=20)
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--pooling", choices=("cls", "mean"), default=None, help="ViT features (default: cls)")

    linear = commands.add_parser("linear", parents=[common], formatter_class=formatter,
                                 help="linear probe top-1 (frozen encoder, MAE's protocol)")
    _probe_arguments(linear, prefix="")
    linear.add_argument("--save-classifier", default=None, help="save encoder + trained head (.keras) here")

    finetune = commands.add_parser("finetune", parents=[common], formatter_class=formatter,
                                   help="fine-tuning top-1 (encoder trained end to end)")
    finetune.set_defaults(batch_size=128)
    finetune.add_argument("--pooling", choices=("cls", "mean"), default=None, help="ViT features (default: mean)")
    finetune.add_argument("--epochs", type=cli.positive_int, default=100)
    finetune.add_argument("--base-lr", type=float, default=2e-3, help="lr = base-lr x batch / 512")
    finetune.add_argument("--layer-decay", type=float, default=0.8, help="layer-wise lr decay (ViT; 1: off)")
    finetune.add_argument("--weight-decay", type=float, default=0.05)
    finetune.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate (ViT)")
    finetune.add_argument("--label-smoothing", type=float, default=0.1)
    finetune.add_argument("--warmup-epochs", type=float, default=5)
    finetune.add_argument("--min-lr", type=float, default=1e-6)
    finetune.add_argument("--rand-augment", type=float, default=9, help="RandAugment magnitude 0-10 (0: off)")
    finetune.add_argument("--random-erasing", type=float, default=0.25, help="probability (0: off)")
    finetune.add_argument("--mixup", type=float, default=0.8, help="MixUp alpha (0: off)")
    finetune.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0: off)")
    finetune.add_argument("--no-jit", action="store_true", help="disable XLA compilation (TensorFlow/JAX)")
    finetune.add_argument("--save-classifier", default=None, help="save the fine-tuned classifier (.keras) here")

    robust = commands.add_parser("robustness", parents=[common], formatter_class=formatter,
                                 help="top-1 under corruptions and FGSM")
    robust.add_argument("--classifier", default=None,
                        help="a classifier .keras (eval.py finetune/linear --save-classifier); without it a "
                             "linear probe is trained on --encoder/--random-init first")
    robust.add_argument("--corruptions", default=None,
                        help="comma-separated names (default: all of keras_mfm.corruptions.CORRUPTIONS)")
    robust.add_argument("--severities", type=_ints, default=[1, 2, 3, 4, 5], help="comma-separated, 1-5")
    robust.add_argument("--fgsm-epsilon", type=_floats, default=[1 / 255],
                        help="comma-separated FGSM step sizes for images in [0, 1], e.g. 1/255,2/255")
    _probe_arguments(robust, prefix="probe-")

    show = commands.add_parser("show", formatter_class=formatter,
                               help="figures of a pre-training run: reconstructions, training curves, corruptions")
    show.add_argument("--checkpoint", help="a run's checkpoint.keras (the whole pre-training model)")
    show.add_argument("--run", metavar="RUN",
                      help="a train.py output directory: --checkpoint RUN/checkpoint.keras, history RUN/history.csv")
    show.add_argument("--data", required=True, help="image folder, .tar.gz of one, or tfds:NAME (test images)")
    show.add_argument("--output", required=True, metavar="DIR",
                      help="directory for reconstruction.png, history.png and corruptions.png")
    show.add_argument("--skip-unreadable", action="store_true", help="leave out image files that cannot be decoded")
    show.add_argument("--images", type=cli.positive_int, default=4, help="number of test images (rows of the figures)")
    show.add_argument("--history", default=None,
                      help="history.csv to plot (None: the one next to the checkpoint, if there is one)")
    show.add_argument("--image-size", type=int, default=None, help="must match the model's (None: the model's)")
    show.add_argument("--dpi", type=cli.positive_int, default=100, help="resolution of the PNGs")
    show.add_argument("--backend", choices=BACKENDS, default=None, help="Keras backend")
    show.add_argument("--seed", type=int, default=0, help="which test images, and the masks drawn")
    args = parser.parse_args(argv)
    if args.command == "show":
        if bool(args.checkpoint) == bool(args.run):
            parser.error("show: give exactly one of --checkpoint or --run")
        return args
    sources = [bool(args.encoder), bool(args.random_init), bool(getattr(args, "classifier", None))]
    if sum(sources) != 1:
        wanted = "--encoder, --random-init or --classifier" if args.command == "robustness" else \
            "--encoder or --random-init"
        parser.error(f"{args.command}: give exactly one of {wanted}")
    if getattr(args, "save_classifier", None) and not args.save_classifier.endswith(".keras"):
        parser.error(f"--save-classifier must name a .keras file, got {args.save_classifier!r}")
    return args


def _probe_arguments(parser, prefix):
    parser.add_argument(f"--{prefix}pooling", choices=("cls", "mean"), default=None,
                        help="ViT features of the linear probe (default: cls)")
    parser.add_argument(f"--{prefix}epochs", type=cli.positive_int, default=90, help="linear probe epochs")
    parser.add_argument("--probe-batch-size", type=cli.positive_int, default=256,
                        help="linear probe batch size")
    parser.add_argument(f"--{prefix}lr", type=float, default=6.4,
                        help="linear probe peak lr (MAE's 0.1 x 16384 / 256; LARS steps do not scale with batch)")
    parser.add_argument(f"--{prefix}base-lr", type=float, default=None,
                        help="instead of --lr: lr = base-lr x batch / 256 (MAE's rule, 0.1)")
    parser.add_argument(f"--{prefix}warmup-epochs", type=float, default=10, help="linear probe warm-up epochs")


def load_encoder(args):
    from keras_mfm import backbones, training

    if args.encoder:
        encoder = training.load_model_file(args.encoder, "encoder")
        if not isinstance(encoder, backbones.Backbone):
            raise ValueError(
                f"{args.encoder} holds a {type(encoder).__name__}, not an encoder: pass the encoder.keras "
                "written by train.py (or a classifier with `robustness --classifier`)."
            )
    else:
        overrides = {"depth": args.depth} if args.depth and args.random_init.startswith("vit") else {}
        patch = args.patch_size if args.random_init.startswith("vit") else None
        encoder = backbones.get_backbone(args.random_init, args.image_size or 32, patch_size=patch, **overrides)
    if args.image_size and (args.image_size, args.image_size) != tuple(encoder.image_size):
        height, width = encoder.image_size
        raise ValueError(
            f"The encoder was built for {height}x{width} images and cannot take --image-size {args.image_size}."
        )
    return encoder


def load_classifier(path):
    from keras_mfm import models, training

    classifier = training.load_model_file(path, "classifier")
    if not isinstance(classifier, models.ImageClassifier):
        raise ValueError(
            f"{path} holds a {type(classifier).__name__}, not a classifier: pass a file written by "
            "`eval.py finetune --save-classifier` or `eval.py linear --save-classifier`."
        )
    return classifier


def show(args, source):
    """`eval.py show`: writes the run's figures into `args.output`; returns their paths."""
    import keras

    from keras_mfm import training, visualize
    from keras_mfm.layers.frequency_masking import FrequencyMasking

    keras.utils.set_random_seed(args.seed)
    checkpoint = args.checkpoint or os.path.join(args.run, training.CHECKPOINT)
    history = args.history
    if history is None:  # the run's own history.csv, if the checkpoint sits in a run directory
        beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "history.csv")
        history = beside if os.path.isfile(beside) else None
    model = visualize.check_pretraining_model(training.load_model_file(checkpoint, "checkpoint"), checkpoint)
    height, width = model.encoder.image_size
    if args.image_size and (args.image_size, args.image_size) != (height, width):
        raise ValueError(f"The model was built for {height}x{width} images and cannot take --image-size "
                         f"{args.image_size}.")
    if history:
        visualize.read_history(history)  # a bad history.csv fails before any data is read
    images = visualize.load_images(source, args.images, (height, width), seed=args.seed)
    os.makedirs(args.output, exist_ok=True)
    paths = [visualize.reconstruction_figure(model, images, os.path.join(args.output, "reconstruction.png"),
                                             seed=args.seed, dpi=args.dpi)]
    if history:
        paths.append(visualize.history_figure(history, os.path.join(args.output, "history.png"), dpi=args.dpi))
    corruption = getattr(model, "corruption", None)
    radius = corruption.radius if isinstance(corruption, FrequencyMasking) and corruption.radius_range is None \
        else None
    paths.append(visualize.corruption_figure(images, os.path.join(args.output, "corruptions.png"),
                                             patch_size=getattr(model.encoder, "patch_size", 4), radius=radius,
                                             seed=args.seed, dpi=args.dpi))
    return paths


def run(args, source):
    import keras

    from keras_mfm import evaluation

    keras.utils.set_random_seed(args.seed)
    subset = dict(train_images=args.train_images or None, test_images=args.test_images or None, seed=args.seed,
                  verbose=int(args.verbose))
    if args.command == "knn":
        return evaluation.evaluate_knn_on_data(
            load_encoder(args), source, args.batch_size, k=args.k, temperature=args.temperature,
            pooling=args.pooling, **subset,
        ), None
    if args.command == "linear":
        result = evaluation.linear_probe_on_data(
            load_encoder(args), source, args.batch_size, pooling=args.pooling, epochs=args.epochs,
            probe_batch_size=args.probe_batch_size, lr=args.lr, base_lr=args.base_lr,
            warmup_epochs=args.warmup_epochs,
            **subset,
        )
        return result, result.classifier
    if args.command == "finetune":
        result = evaluation.finetune_on_data(
            load_encoder(args), source, args.batch_size, rand_augment=args.rand_augment,
            random_erasing=args.random_erasing, mixup=args.mixup, cutmix=args.cutmix, epochs=args.epochs,
            pooling=args.pooling, base_lr=args.base_lr, layer_decay=args.layer_decay,
            weight_decay=args.weight_decay, drop_path=args.drop_path, label_smoothing=args.label_smoothing,
            warmup_epochs=args.warmup_epochs, min_lr=args.min_lr, jit_compile=False if args.no_jit else "auto",
            **subset,
        )
        return result, result.classifier
    # robustness
    probe = None
    if args.classifier:
        classifier = load_classifier(args.classifier)
        if args.image_size and (args.image_size, args.image_size) != tuple(classifier.image_size):
            raise ValueError(f"The classifier takes {classifier.image_size[0]}x{classifier.image_size[1]} images, "
                             f"not --image-size {args.image_size}.")
    else:
        probe = evaluation.linear_probe_on_data(
            load_encoder(args), source, args.batch_size, pooling=args.probe_pooling, epochs=args.probe_epochs,
            probe_batch_size=args.probe_batch_size, lr=args.probe_lr, base_lr=args.probe_base_lr,
            warmup_epochs=args.probe_warmup_epochs, **subset,
        )
        classifier = probe.classifier
    corruptions = args.corruptions.split(",") if args.corruptions else None
    result = evaluation.robustness_on_data(
        classifier, source, args.batch_size, test_images=args.test_images or None, seed=args.seed,
        verbose=int(args.verbose), corruptions=corruptions, severities=args.severities,
        fgsm_epsilons=args.fgsm_epsilon,
    )
    if probe is not None:
        result["linear_probe"] = dict(probe)
    return result, None


def summary(command, metrics):
    images = f"{metrics.get('train_images', '-')} train / {metrics['test_images']} test images"
    if command == "knn":
        return (f"knn: top-1 {metrics['knn_top1']:.2f}% ({images}, k={metrics['k']}, T={metrics['temperature']}, "
                f"{metrics['seconds']:.0f} s)")
    if command == "linear":
        return (f"linear: top-1 {metrics['linear_top1']:.2f}% (train {metrics['train_top1']:.2f}%; {images}, "
                f"{metrics['epochs']} epochs, {metrics['seconds']:.0f} s)")
    if command == "finetune":
        losses = metrics["train_loss"]
        return (f"finetune: top-1 {metrics['finetune_top1']:.2f}% (loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
                f"{images}, {metrics['epochs']} epochs, {metrics['seconds']:.0f} s)")
    parts = [f"clean {metrics['clean_top1']:.2f}%", f"corruptions mean {metrics['mean_corruption_top1']:.2f}%"]
    parts += [f"FGSM {eps}: {top:.2f}%" for eps, top in metrics["fgsm"].items()]
    return f"robustness: {', '.join(parts)} ({metrics['test_images']} test images, {metrics['seconds']:.0f} s)"


def main(argv=None, program="eval.py"):
    """Runs the command line `argv` (default: `sys.argv[1:]`); returns the exit code. Errors are
    one line, `PROGRAM COMMAND: error: ...`."""
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    cli.quiet_tensorflow(argv)
    import keras

    if args.backend and keras.backend.backend() != args.backend:  # Keras came in under another backend
        return cli.rerun_under_backend(MODULE, argv, args.backend, replace_process=as_program)

    from keras_mfm import data, training

    for path, flag, folder in ((getattr(args, "output", None), "--output", args.command == "show"),
                               (getattr(args, "save_classifier", None), "--save-classifier", False)):
        problem = cli.output_problem(path, flag, folder)
        if problem:
            return cli.error_line(f"{program} {args.command}", problem)
    try:
        source = data.resolve_data(args.data, skip_unreadable=args.skip_unreadable)
        with data.undecodable_named(source):  # a truncated image: named, not a pipeline traceback
            if args.command == "show":
                for path in show(args, source):
                    print(path)
                return 0
            metrics, classifier = run(args, source)
    except (data.DataError, ValueError, training.TrainingError, FloatingPointError) as error:
        return cli.error_line(f"{program} {args.command}", error)
    except OSError as error:
        return cli.error_line(f"{program} {args.command}", cli.os_error_line(error))
    model_source = args.classifier if getattr(args, "classifier", None) else \
        (args.encoder or f"random-init {args.random_init}")
    metrics.update({"source": model_source, "data": args.data, "backend": keras.backend.backend()})
    print(summary(args.command, metrics))
    if getattr(args, "save_classifier", None) and classifier is not None:
        training.save_atomically(classifier, args.save_classifier)
        print(f"classifier saved to {args.save_classifier}")
    if args.output:
        training.write_json_atomically(args.output, dict(metrics))
    return 0


def console_main():
    """The `keras-mfm-eval` command."""
    sys.exit(main(program="keras-mfm-eval"))


if __name__ == "__main__":
    sys.exit(main())
