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
        if "default" in (action.help or "") or type(action) is argparse._StoreConstAction:  # a switch: no default
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
    from keras_mfm.optimizers.recipes import RECIPES

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


def _count_or_all(text):
    """argparse type of a count where 0 means "all" (None)."""
    value = int(text)
    return None if value == 0 else value


def build_parser(argv=None):
    """The command line's `ArgumentParser`: one flag per `PretrainConfig` field (its default and help
    written there, `keras_mfm.settings`), and the flags of the command itself (--backend, --resume,
    --overwrite, --verbose). Its --help epilog lists the methods and recipes when `argv` asks."""
    import dataclasses

    from keras_mfm.settings import GROUPS, PretrainConfig

    parser = argparse.ArgumentParser(
        description="Self-supervised pre-training of a ViT or ResNet-50 encoder with keras_mfm "
        "(Masked Frequency Modeling, its restoration baselines, MAE/AMT/FAMT, SimMIM). Runs on the "
        "TensorFlow, JAX or PyTorch backend of Keras 3.",
        epilog=_methods_epilog(argv),
        formatter_class=_HelpFormatter,
    )
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    run = groups["run"]
    run.add_argument("--backend", choices=BACKENDS, default=None,
                     help="Keras backend (sets KERAS_BACKEND before Keras loads; default: $KERAS_BACKEND or "
                     "tensorflow)")
    run.add_argument("--overwrite", action="store_true",
                     help="start a new run in an --output folder that already holds one (its files are replaced)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --output from its last checkpoint, with its saved settings")
    run.add_argument("--verbose", action="store_true", dest="backend_logs",
                     help="show the backends' own start-up log lines")
    for field in dataclasses.fields(PretrainConfig):
        meta = dict(field.metadata)
        group = groups[meta.pop("group")]
        help_text = meta.pop("help").replace("%", "%%")
        switch_help = meta.pop("switch_help", {})
        flag = meta.pop("flag", None)
        if isinstance(flag, dict):  # switches setting the field to a value each
            switches = group.add_mutually_exclusive_group() if len(flag) > 1 else group
            for name, value in flag.items():
                switches.add_argument(name, dest=field.name, action="store_const", const=value, default=field.default,
                                      help=switch_help.get(name, help_text).replace("%", "%%"))
            continue
        options = {"dest": field.name, "default": field.default, "help": help_text}
        if meta.pop("zero_is_none", False):
            options["type"] = _count_or_all
        if field.type is bool:
            options["action"] = "store_true"
        else:
            options.setdefault("type", meta.pop("type", field.type))
        options.update(meta)  # nargs, choices, metavar
        group.add_argument(flag or "--" + field.name.replace("_", "-"), **options)
    return parser


def parse_args(argv=None):
    return build_parser(argv).parse_args(argv)


def given_flags(argv):
    """The destinations of the flags written in `argv` (not those left at their defaults)."""
    parser = build_parser([])
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


#: flags that do not change what a run computes, allowed with --resume (`verbose`: --quiet)
RESUME_FLAGS = {"resume", "output", "backend", "verbose", "backend_logs"}


def resume_conflicts(args, argv, recorded):
    """`--flag value (the run has X)` for every flag given with --resume that differs from the run's
    recorded settings `recorded` (config.json's "config")."""
    import json

    given = given_flags(argv) - RESUME_FLAGS
    wanted = json.loads(json.dumps(config_from_args(args).to_json()))  # tuples as lists, like the record
    flags = {}  # destination -> the flag written in argv (--jit and --no-jit share one)
    for action in build_parser([])._actions:
        written = [name for name in action.option_strings if name in argv]
        if written:
            flags[action.dest] = written[0]
    conflicts = []
    for dest in sorted(given):
        if dest == "overwrite":
            conflicts.append("--overwrite (a resumed run keeps its files)")
            continue
        if dest in wanted and wanted[dest] != recorded.get(dest):
            conflicts.append(f"{flags.get(dest, dest)} {wanted[dest]} (the run has {recorded.get(dest)})")
    return conflicts


def config_from_args(args):
    """The `PretrainConfig` of parsed command-line `args`."""
    import dataclasses

    from keras_mfm.settings import PretrainConfig

    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(PretrainConfig)}
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    return PretrainConfig(**values)


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
