"""Pre-train an encoder with keras_mfm (`keras-mfm-train`, `python train.py`).

    keras-mfm-train --data ../shared/data/cifar10-jpeg.tar.gz --epochs 1 --steps-per-epoch 20

Writes OUTPUT/encoder.keras, OUTPUT/config.json, OUTPUT/history.csv and a checkpoint that
`--resume` continues from. See README.md for the methods and the recipe.
"""

import argparse
import os
import sys

from keras_mfm import cli
from keras_mfm.cli import BACKENDS

MODULE = "keras_mfm.cli.train"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag's help (unless it states its own); the epilog's method table as written."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _methods_epilog(argv):
    """The registered methods, for --help only: listing them imports Keras, which must wait for
    --backend otherwise."""
    argv = sys.argv[1:] if argv is None else argv
    if not {"-h", "--help"} & set(argv):
        return None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_mfm.methods import available_methods

    from keras_mfm.methods import get_method
    from keras_mfm.optimization import RECIPES

    lines = [f"  {name:<12} {description} [recipe {get_method(name).recipe}, init {get_method(name).init}]"
             for name, description in available_methods().items()]
    recipes = []
    for name, r in RECIPES.items():
        decay = "cosine" if r.decay == "cosine" else f"x{r.gamma} at {', '.join(f'{m:.0%}' for m in r.milestones)}"
        recipes.append(
            f"  {name:<7} lr {r.base_lr:g} x batch/{r.reference_batch_size}, min {r.min_lr:g}, warm-up "
            f"{r.warmup_fraction:.1%} of the run from {r.warmup_lr:g}, {decay}, betas ({r.beta_1}, {r.beta_2}), "
            f"eps {r.epsilon:g}, weight decay {r.weight_decay}, clip {r.clip_norm or 'none'}, no decay on rank<=1"
            + (f" and {', '.join(r.no_decay_names)}" if r.no_decay_names else ""))
    return ("methods (--method):\n" + "\n".join(lines) + "\n\nrecipes (--recipe; rates per reference batch):\n"
            + "\n".join(recipes))


def build_parser(argv=None):
    """The command line's `ArgumentParser` (its --help epilog lists the methods when `argv` asks)."""
    parser = argparse.ArgumentParser(
        description="Self-supervised pre-training of a ViT or ResNet-50 encoder with keras_mfm "
        "(Masked Frequency Modeling, its restoration baselines, MAE/AMT/FAMT, SimMIM). Runs on the "
        "TensorFlow, JAX or PyTorch backend of Keras 3.",
        epilog=_methods_epilog(argv),
        formatter_class=_HelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument("--method", default="mfm", help="pre-training method, one of the registered methods listed "
                     "below (keras_mfm.methods)")
    run.add_argument("--backend", choices=BACKENDS, default=None,
                     help="Keras backend (sets KERAS_BACKEND before Keras loads; default: $KERAS_BACKEND or tensorflow)")
    run.add_argument("--data", default=None,
                     help="image folder with train/ and test/ (one sub-folder per class), a .tar.gz of one, "
                     "or tfds:NAME (default: tfds:cifar10, which needs the network)")
    run.add_argument("--output", default="runs/mfm", help="output folder")
    run.add_argument("--skip-unreadable", action="store_true",
                     help="leave out image files that cannot be decoded (empty, not an image, truncated), with a "
                     "count, instead of stopping at the first (every image is decoded once first)")
    run.add_argument("--overwrite", action="store_true",
                     help="start a new run in an --output folder that already holds one (its files are replaced)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --output from its last checkpoint, with its saved settings")
    run.add_argument("--seed", type=int, default=0, help="random seed (weights, masks, data order)")
    run.add_argument("--tensorboard", action="store_true",
                     help="TensorBoard logs in OUTPUT/tensorboard: loss, lr, images/s per epoch and the reconstruction "
                     "figure of 4 training images (tensorboard --logdir OUTPUT/tensorboard)")
    run.add_argument("--tensorboard-every", type=int, default=None,
                     help="epochs between reconstruction figures (default: 10%% of --epochs, >= 1; the last epoch always)")
    run.add_argument("--checkpoint-steps", type=int, default=None,
                     help="also write the checkpoint every N steps inside an epoch (default: at epoch ends only)")
    run.add_argument("--eval", default="knn,linear", help="score the encoder after pre-training: knn (weighted k-NN, "
                     "k=20, T=0.07), linear (MAE's linear probe, 90 epochs on cached features), knn,linear "
                     "(both, one feature extraction) or none; on seeded subsets of the splits")
    run.add_argument("--eval-train-images", type=int, default=10_000,
                     help="k-NN bank / linear-probe training images (0: the whole training split)")
    run.add_argument("--eval-test-images", type=int, default=2_000, help="test images (0: the whole test split)")
    run.add_argument("--monitor-knn", type=int, default=None, metavar="N",
                     help="every N epochs, k-NN top-1 of the encoder on the --eval-train-images bank and "
                     "--eval-test-images held-out images, in history.csv and TensorBoard as knn_top1")
    jit = run.add_mutually_exclusive_group()
    jit.add_argument("--no-jit", action="store_true",
                     help="run the train step without XLA (default, Keras' auto: XLA on JAX, and on TensorFlow when "
                     "a GPU/TPU is present; PyTorch eager)")
    jit.add_argument("--jit", action="store_true",
                     help="compile the train step with XLA on TensorFlow even on a CPU-only machine, torch.compile "
                     "on PyTorch")
    run.add_argument("--precision", choices=("float32", "mixed_bfloat16", "mixed_float16"), default="float32",
                     help="dtype policy; FFTs, losses and the FAMT importance stay float32, mixed_float16 adds "
                     "dynamic loss scaling")

    scale = parser.add_argument_group("distribution (keras_mfm.distribution; --batch-size is the global batch)")
    scale.add_argument("--distribute", action="store_true",
                       help="data-parallel over every device: keras.distribution.DataParallel on JAX, "
                       "tf.distribute.MirroredStrategy on TensorFlow (MultiWorkerMirroredStrategy with TF_CONFIG); "
                       "not available on PyTorch")
    scale.add_argument("--devices", type=int, default=None, help="with --distribute: use only the first N devices")
    scale.add_argument("--cpu-devices", type=int, default=None,
                       help="with --distribute: split the CPU into N virtual devices (to try distribution without "
                       "accelerators)")
    scale.add_argument("--coordinator-address", default=None,
                       help="several JAX hosts: host:port of process 0 (with --num-processes and --process-id)")
    scale.add_argument("--num-processes", type=int, default=None, help="several JAX hosts: their number")
    scale.add_argument("--process-id", type=int, default=None, help="several JAX hosts: this host's rank")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--verbose", action="store_true", help="show the backends' own start-up log lines")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", default="vit_tiny",
                       help="vit_tiny | vit_small | vit_base | resnet50 (timm's v1.5 with zero-init last BatchNorms, MFM's; "
                       "= resnet50_v1_5) | resnet50_v1 (Keras' application)")
    model.add_argument("--image-size", type=int, default=32, help="training image size (square)")
    model.add_argument("--patch-size", type=int, default=4, help="ViT patch size (the image size must be a multiple)")
    model.add_argument("--depth", type=int, default=None, help="override the ViT preset's number of blocks")

    mfm = parser.add_argument_group("MFM (--method mfm)")
    mfm.add_argument("--radius", type=float, default=None,
                     help="mask radius r1 in frequency-index units (default: 16/224 * image size, 2.29 at 32)")
    mfm.add_argument("--outer-radius", type=float, default=None,
                     help="band masks: outer radius r2 > r1; low-pass then keeps |k|<r1 and |k|>=r2, high-pass the "
                     "ring r1<=|k|<r2 (default: no band, the authors' 999)")
    mfm.add_argument("--radius-range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                     help="draw each image's radius uniformly in [MIN, MAX) instead of a fixed --radius")
    mfm.add_argument("--p-low", type=float, default=None,
                     help="probability of a low-pass mask (default: 0.5 for ViT, 0.3 for ResNet-50)")
    mfm.add_argument("--full-spectrum-loss", action="store_true",
                     help="average the frequency loss over the whole spectrum instead of the masked frequencies")

    loss = parser.add_argument_group("frequency loss (mfm, sr, deblur, denoise)")
    loss.add_argument("--loss", choices=("frequency", "pixel"), default="frequency",
                      help="frequency loss, or pixel: mean squared error of the normalised pixels")
    loss.add_argument("--gamma", type=float, default=1.0, help="exponent of the frequency distance")
    loss.add_argument("--focal", action="store_true",
                      help="weight each frequency by the focal spectrum weight matrix |P-T|^alpha, normalised to [0, 1] "
                      "(focal frequency loss; off in the authors' configs)")
    loss.add_argument("--focal-alpha", type=float, default=1.0, help="exponent alpha of the focal weight matrix")
    loss.add_argument("--focal-log", action="store_true", help="focal weights log(1 + |P-T|^alpha)")
    loss.add_argument("--focal-batch", action="store_true",
                      help="normalise the focal weights by the batch maximum instead of each image and channel's")

    restoration = parser.add_argument_group("restoration baselines (--method sr|deblur|denoise)")
    restoration.add_argument("--sr-factor", type=int, default=8,
                             help="sr: bicubic down-sampling factor (must divide the image size)")
    restoration.add_argument("--blur-sigma", type=float, default=None,
                             help="deblur: Gaussian sigma in pixels (default: 5 at 224, scaled: 0.71 at 32)")
    restoration.add_argument("--blur-kernel-sizes", type=int, nargs="+", default=None,
                             help="deblur: odd kernel sizes drawn per image (default: 7..21 at 224, scaled: 3 at 32)")
    restoration.add_argument("--noise-sigma", type=float, default=75 / 255,
                             help="denoise: standard deviation of the additive Gaussian noise (images in [0, 1])")

    mae = parser.add_argument_group("token masking (--method mae|amt|famt|simmim|simmim_famt)")
    mae.add_argument("--mask-ratio", type=float, default=None,
                     help="share of masked patches (default: 0.75 mae, 0.45 amt/famt/simmim_famt, 0.6 simmim)")
    mae.add_argument("--throw-ratio", type=float, default=None,
                     help="share of thrown patches (default: 0 for mae/simmim, 0.40 for amt/famt/simmim_famt)")
    mae.add_argument("--mask-patch-size", type=int, default=None,
                     help="simmim: side of a random-masking unit in pixels, a multiple of the patch size "
                     "(default: 2 x patch size, as SimMIM's 32 for 16)")
    mae.add_argument("--refresh-warmup", type=int, default=None,
                     help="amt/famt: epochs of plain MAE before the first importance refresh (default: 10%% of --epochs, >= 1)")
    mae.add_argument("--refresh-interval", type=int, default=None,
                     help="amt/famt: epochs between importance refreshes (default: 10%% of --epochs, >= 1)")
    mae.add_argument("--decoder-dim", type=int, default=512, help="MAE decoder width")
    mae.add_argument("--decoder-depth", type=int, default=8, help="MAE decoder blocks")
    mae.add_argument("--decoder-heads", type=int, default=16, help="MAE decoder heads")
    mae.add_argument("--norm-pix-loss", action="store_true", help="MAE: per-patch normalised pixel targets")

    optim = parser.add_argument_group("optimisation (AdamW with PyTorch's update, per-step schedule; defaults: the "
                                      "method's authors' recipe, listed below)")
    optim.add_argument("--epochs", type=int, default=1, help="epochs")
    optim.add_argument("--steps-per-epoch", type=int, default=None,
                       help="steps per epoch (default: one pass over the training split)")
    optim.add_argument("--batch-size", type=int, default=128, help="global batch size")
    optim.add_argument("--recipe", default=None,
                       help="optimisation recipe: mfm, mae or simmim (default: the method's authors', e.g. mae for famt)")
    optim.add_argument("--init", default=None,
                       help="ViT weight-init scheme: mfm, mae or simmim (default: the method's authors')")
    optim.add_argument("--base-lr", type=float, default=None,
                       help="peak learning rate per reference batch of the recipe (lr = base * batch / reference; "
                       "default: the recipe's)")
    optim.add_argument("--lr", type=float, default=None, help="absolute peak learning rate (overrides --base-lr)")
    optim.add_argument("--min-lr", type=float, default=None,
                       help="absolute final learning rate (default: the recipe's, scaled with the batch)")
    optim.add_argument("--warmup-epochs", type=float, default=None, help="warm-up epochs (default: the recipe's share "
                       "of --epochs)")
    optim.add_argument("--weight-decay", type=float, default=None,
                       help="AdamW weight decay (default: the recipe's, 0.05; which variables it skips is the recipe's)")
    optim.add_argument("--clip-norm", type=float, default=None,
                       help="global gradient-norm clipping, 0: off (default: the recipe's)")
    return parser


def parse_args(argv=None):
    return build_parser(argv).parse_args(argv)


def given_flags(argv):
    """The destinations of the flags written in `argv` (not those left at their defaults)."""
    parser = build_parser([])
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


#: flags that do not change what a run computes, allowed with --resume
RESUME_FLAGS = {"resume", "output", "backend", "quiet", "verbose"}
#: flag destinations whose PretrainConfig field has another name
FLAG_FIELDS = {"full_spectrum_loss": "masked_loss", "jit": "jit_compile", "no_jit": "jit_compile"}


def resume_conflicts(args, argv, recorded):
    """`--flag value (the run has X)` for every flag given with --resume that differs from the run's
    recorded settings `recorded` (config.json's "config")."""
    import json

    given = given_flags(argv) - RESUME_FLAGS
    wanted = json.loads(json.dumps(config_from_args(args).to_json()))  # tuples as lists, like the record
    conflicts = []
    for dest in sorted(given):
        if dest == "overwrite":
            conflicts.append("--overwrite (a resumed run keeps its files)")
            continue
        field = FLAG_FIELDS.get(dest, dest)
        if field in wanted and wanted[field] != recorded.get(field):
            conflicts.append(f"--{dest.replace('_', '-')} {wanted[field]} (the run has {recorded.get(field)})")
    return conflicts


def config_from_args(args):
    """The `PretrainConfig` of parsed command-line `args`."""
    from keras_mfm import training

    return training.PretrainConfig(
        method=args.method, backbone=args.backbone, image_size=args.image_size,
        patch_size=args.patch_size, depth=args.depth, data=args.data or "tfds:cifar10",
        epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
        recipe=args.recipe, init=args.init,
        base_lr=args.base_lr, lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
        weight_decay=args.weight_decay, clip_norm=args.clip_norm, radius=args.radius,
        p_low=args.p_low, outer_radius=args.outer_radius,
        radius_range=tuple(args.radius_range) if args.radius_range else None,
        masked_loss=not args.full_spectrum_loss, loss=args.loss, gamma=args.gamma, focal=args.focal,
        focal_alpha=args.focal_alpha, focal_log=args.focal_log, focal_batch=args.focal_batch,
        sr_factor=args.sr_factor, blur_sigma=args.blur_sigma,
        blur_kernel_sizes=tuple(args.blur_kernel_sizes) if args.blur_kernel_sizes else None,
        noise_sigma=args.noise_sigma, mask_patch_size=args.mask_patch_size,
        mask_ratio=args.mask_ratio, throw_ratio=args.throw_ratio, refresh_warmup=args.refresh_warmup,
        refresh_interval=args.refresh_interval, decoder_dim=args.decoder_dim,
        decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
        norm_pix_loss=args.norm_pix_loss,
        seed=args.seed, checkpoint_steps=args.checkpoint_steps, tensorboard=args.tensorboard,
        tensorboard_every=args.tensorboard_every, output=args.output, jit_compile=False if args.no_jit else True if args.jit else "auto",
        precision=args.precision, distribute=args.distribute, devices=args.devices,
        cpu_devices=args.cpu_devices, coordinator_address=args.coordinator_address,
        num_processes=args.num_processes, process_id=args.process_id,
        verbose=0 if args.quiet else 1, eval=args.eval,
        eval_train_images=args.eval_train_images or None, eval_test_images=args.eval_test_images or None,
        monitor_knn=args.monitor_knn, skip_unreadable=args.skip_unreadable,
    )


def main(argv=None, program="train.py"):
    """Runs the command line `argv` (default: `sys.argv[1:]`); returns the exit code. Errors are
    one line, `PROGRAM: error: ...`."""
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    if args.resume:  # the run's own backend and settings, before Keras loads
        import json

        try:
            with open(os.path.join(args.output, "config.json")) as handle:
                record = json.load(handle)
            recorded_backend, recorded = record.get("backend"), record["config"]
        except FileNotFoundError:
            return cli.error_line(program, f"Nothing to resume in {args.output}: no config.json.")
        except (OSError, ValueError, KeyError, TypeError) as error:
            return cli.error_line(program, f"Cannot resume {args.output}: its config.json is unreadable ({error}).")
        if args.backend and recorded_backend and args.backend != recorded_backend:
            return cli.error_line(program, f"the run in {args.output} was trained on the {recorded_backend} backend; "
                                           f"--resume continues it there (drop --backend {args.backend}).")
        args.backend = args.backend or recorded_backend
        if args.backend and args.backend not in argv:
            argv = [*argv, "--backend", args.backend]
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    cli.quiet_tensorflow(argv)
    import keras

    if args.backend and keras.backend.backend() != args.backend:  # Keras came in under another backend
        return cli.rerun_under_backend(MODULE, argv, args.backend, replace_process=as_program)

    from keras_mfm import data, distribution, training

    try:
        if args.resume:
            conflicts = resume_conflicts(args, argv, recorded)
            if conflicts:
                return cli.error_line(program, f"--resume continues the run in {args.output} with its recorded "
                                               f"settings; these flags differ: {'; '.join(conflicts)}. Drop them, "
                                               "or start a new run (another --output, or --overwrite).")
            result = training.resume(args.output)
        else:
            config = config_from_args(args)
            result = training.pretrain(config, overwrite=args.overwrite)
    except (data.DataError, distribution.DistributionError, ValueError, training.TrainingError) as error:
        return cli.error_line(program, error)
    except OSError as error:  # the file system: a read-only folder, a full disk, a path under a file
        return cli.error_line(program, cli.os_error_line(error))
    info = result["info"]
    print(
        f"done: {info['epochs_done']} epoch(s) of {info['config']['method']} on {info['backend']}, "
        f"final loss {info['final_loss']:.4f}, {info['seconds_per_epoch']:.1f} s/epoch; "
        f"encoder: {result['encoder_path']}"
    )
    if "evaluation" in info:
        e = info["evaluation"]
        scores = [f"{name} top-1: {e[key]:.2f}%" for name, key in (("k-NN", "knn_top1"), ("linear", "linear_top1"))
                  if key in e]
        print(f"{', '.join(scores)} ({e['train_images']} train / {e['test_images']} test images, "
              f"{e['seconds']:.0f} s)")
    return 0


def console_main():
    """The `keras-mfm-train` command."""
    sys.exit(main(program="keras-mfm-train"))


if __name__ == "__main__":
    sys.exit(main())
