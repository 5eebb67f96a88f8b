"""The `keras-mfm-convert` command (`python -m keras_mfm.convert`): a PyTorch checkpoint to an encoder
`.keras` file; see `keras_mfm.interop`."""

import argparse
import os
import sys
import warnings

from keras_mfm import cli
from keras_mfm.cli import BACKENDS
from keras_mfm import interop
from keras_mfm.interop import convert_checkpoint


def _parser():
    parser = cli.OneLineParser(prog="convert", description=interop.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="PyTorch checkpoint (.pth, .pt, .bin) or .safetensors file")
    parser.add_argument("--backbone", required=True,
                        help="preset: vit_tiny | vit_small | vit_base | resnet50 (= resnet50_v1_5)")
    parser.add_argument("--image-size", type=int, default=224, help="default: 224")
    parser.add_argument("--patch-size", type=int, default=None, help="ViT patch size (default 16)")
    parser.add_argument("--output", required=True, help="the encoder .keras file to write")
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="Keras backend (default: current)")
    vit = parser.add_argument_group("ViT overrides of the preset (must match the checkpoint's model)")
    vit.add_argument("--depth", type=int, default=None)
    vit.add_argument("--hidden-dim", type=int, default=None)
    vit.add_argument("--num-heads", type=int, default=None)
    vit.add_argument("--mlp-ratio", type=float, default=None)
    vit.add_argument("--no-qkv-bias", action="store_true", help="the checkpoint's qkv projection has no bias")
    vit.add_argument("--position-embedding", choices=("learned", "sincos"), default=None,
                     help="learned (default; holds the checkpoint's table) or sincos (fixed, frozen)")
    vit.add_argument("--layer-norm-epsilon", type=float, default=None,
                     help="default 1e-6 (timm, MAE, MFM); 1e-5 for models built with PyTorch's default")
    parser.add_argument("--prefix", default=None,
                        help="load only keys under this prefix (default: encoder. or backbone. when present)")
    parser.add_argument("--interpolate-position-embedding", action="store_true",
                        help="resample pos_embed to the encoder's patch grid if it differs")
    return parser


def _error(message):
    return cli.error_line("convert", message)


def main(argv=None):
    """`keras-mfm-convert` / `python -m keras_mfm.convert ...`; returns the exit code (0, or 2 after a
    one-line error)."""
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args, exit_code = cli.parse_and_select_backend("keras_mfm.convert", _parser(), argv,
                                                   replace_process=as_program)
    if args is None:
        return exit_code
    import keras

    if not args.output.endswith(".keras"):
        return _error(f"--output must be a .keras file, got {args.output}.")
    problem = cli.output_problem(args.output)
    if problem:
        return _error(problem)

    names = ("depth", "hidden_dim", "num_heads", "mlp_ratio", "position_embedding", "layer_norm_epsilon")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.no_qkv_bias:
        overrides["qkv_bias"] = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the summary below lists the unused keys
            encoder, report = convert_checkpoint(
                args.checkpoint, args.backbone, args.image_size, args.patch_size, prefix=args.prefix,
                interpolate_position_embedding=args.interpolate_position_embedding, return_report=True,
                **overrides,
            )
    except (ValueError, TypeError) as error:  # ConversionError, bad presets / arguments
        return _error(error)
    except OSError as error:
        return _error(cli.os_error_line(error))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        encoder.save(args.output)
    except OSError as error:
        return _error(cli.os_error_line(error))
    height, width = encoder.image_size
    print(f"converted {args.checkpoint} ({report.summary()}) to {args.output} "
          f"({args.backbone}, {height}x{width}, {keras.backend.backend()} backend)")
    return 0


def console_main():
    """The `keras-mfm-convert` command."""
    sys.exit(main())
