"""Export a trained encoder (or a classifier) for serving, as a TensorFlow SavedModel or as ONNX.

    python -m keras_mfm.export runs/mfm/encoder.keras --format saved_model --output exported/mfm
    python -m keras_mfm.export ft.keras --with-classifier --format onnx --output exported/ft.onnx

    from keras_mfm.export import export_encoder
    export_encoder("runs/mfm/encoder.keras", "exported/mfm")             # or an in-memory encoder

What is exported: a small serving model around the encoder,

    images (batch, H, W, 3) float32 in [0, 1]  ->  {"features": (batch, D) float32}
                                                    (+ "logits": (batch, num_classes) float32)

- the batch size is free (`None`); `H, W` are the encoder's `image_size`;
- the encoder normalises the images itself (ImageNet mean/std), so feed raw [0, 1] RGB, NHWC;
- `features` are the encoder's pooled features, `Backbone.pooled_features(encoder(images), pooling)`,
  in inference mode: pooling `"cls"` (the [CLS] token, the ViT default) or `"mean"` (mean patch
  token) for a ViT, `"mean"` (global average) for ResNet-50. For a classifier the default is the
  classifier's own pooling, the features its head reads;
- `logits` (only with `with_classifier=True` / `--with-classifier`, which needs an
  `ImageClassifier`): the classifier's head on those features.

The artifacts are standalone: TensorFlow or onnxruntime runs them, without keras_mfm's code:

- SavedModel (a directory): `m = tf.saved_model.load(path); m.serve(images)` -> dict with
  `"features"` (and `"logits"`); also the `serving_default` signature (input `images`).
- ONNX (one file): input `"images"`, outputs `"features"` (and `"logits"`), batch axis dynamic:
  `onnxruntime.InferenceSession(path).run(None, {"images": images})`.

Which backend exports which format (measured with Keras 3.15.1, TF 2.21, JAX 0.10.2, torch 2.13):

    backend     saved_model                         onnx
    tensorflow  Keras' ExportArchive                tf2onnx (packages onnx, tf2onnx; this module
                                                    adds the Erfc op exact GELU needs)
    jax         Keras' ExportArchive (jax2tf)       re-opened under TensorFlow (tf2onnx) in a
                                                    subprocess (Keras' jax2onnx route breaks
                                                    ResNet-50's max-pooling for onnxruntime)
    torch       re-opened under TensorFlow in a     torch.onnx, dynamo exporter (packages onnx,
                subprocess (Keras needs torch_xla)  onnxscript)

"Re-opened under TensorFlow": a `.keras` file loads on any backend, so the model (saved to a
temporary `.keras` file first when it was passed in memory) is exported by
`python -m keras_mfm.export ... --backend tensorflow` in a child process; this needs tensorflow
installed, and for ONNX tf2onnx and onnx too. The result is the same model (same weights).

The input must be a `keras_mfm.backbones.Backbone` (the `encoder.keras` written by train.py), a
`keras_mfm.models.ImageClassifier` (`eval.py ... --save-classifier`), or the path of a `.keras` file
holding one (loaded in safe mode). Pre-training models (MFM, MAE, SimMIM, ...) are refused: export
their encoder. Errors are `ValueError` (wrong model, pooling, format), `TrainingError` (missing or
corrupt file) or `ExportError` (a missing package, a failed conversion); the command line prints
them as one line `export: error: ...` and exits with code 2.
"""

import argparse
import functools
import importlib.util
import inspect
import logging
import os
import subprocess
import sys
import tempfile
import warnings

from keras_mfm import cli
from keras_mfm.cli import BACKENDS

FORMATS = ("saved_model", "onnx")
POOLINGS = ("cls", "mean")
#: the backends that export each format in-process; from the others, the model is re-opened under TensorFlow
NATIVE = {"saved_model": ("tensorflow", "jax"), "onnx": ("tensorflow", "torch")}
INPUT_NAME = "images"
_ENCODER_HINT = "export the encoder (runs/NAME/encoder.keras)"


class ExportError(RuntimeError):
    """An export that cannot be done here: a missing package, or a conversion that failed."""


# -- what can be exported from where ----------------------------------------------------------------
def _has(module):
    return importlib.util.find_spec(module) is not None


def export_route(format, backend=None):
    """`"native"` if `format` is exported from `backend` (default: Keras' current one) in this
    process, `"tensorflow"` if the model is re-opened under TensorFlow in a subprocess."""
    _check_format(format)
    return "native" if (backend or _current_backend()) in NATIVE[format] else "tensorflow"


def missing_packages(format, backend=None):
    """The Python packages that exporting `format` from `backend` needs and that are not installed."""
    backend = backend or _current_backend()
    if format == "saved_model":
        needed = ["tensorflow"]
    elif export_route(format, backend) == "tensorflow" or backend == "tensorflow":
        needed = ["tensorflow", "onnx", "tf2onnx"]
    else:  # torch
        needed = ["onnx", "onnxscript"]
    return [name for name in needed if not _has(name)]


def _current_backend():
    import keras

    return keras.backend.backend()


def _check_format(format):
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")


# -- the model to export --------------------------------------------------------------------------
def _describe(model, source):
    name = getattr(model, "name", None)
    what = f"{type(model).__name__} {name!r}" if name else type(model).__name__
    return f"{source} holds a {what}" if source else what


def split_model(model, source=None):
    """`(encoder, classifier)` of an exportable model (`classifier` None for a bare encoder)."""
    from keras_mfm.backbones import Backbone
    from keras_mfm.models import ImageClassifier

    if isinstance(model, ImageClassifier):
        return model.encoder, model
    if isinstance(model, Backbone):
        return model, None
    hint = _ENCODER_HINT
    if isinstance(getattr(model, "encoder", None), Backbone):
        hint += f", or pass its `.encoder` ({type(model.encoder).__name__})"
    subject = f"{_describe(model, source)}, which" if source else _describe(model, None)
    raise ValueError(f"{subject} is not an encoder or classifier; {hint}.")


def default_pooling(encoder, classifier=None):
    """The classifier's pooling, else the default of the encoder's `pooled_features` (ViT: cls)."""
    if classifier is not None:
        return classifier.pooling
    return inspect.signature(encoder.pooled_features).parameters["pooling"].default


def serving_model(model, pooling=None, with_classifier=False):
    """The functional `keras.Model` that is exported: `images` -> `{"features"[, "logits"]}`."""
    import keras
    from keras import ops

    encoder, classifier = split_model(model)
    if with_classifier and classifier is None:
        raise ValueError(
            f"with_classifier needs an ImageClassifier; {_describe(encoder, None)} is a bare encoder "
            "(it has no head: export its features only)."
        )
    if pooling is None:
        pooling = default_pooling(encoder, classifier)
    elif with_classifier and pooling != classifier.pooling:
        raise ValueError(
            f"The classifier's head reads {classifier.pooling!r}-pooled features; pooling {pooling!r} "
            "cannot go with its logits (leave pooling unset)."
        )
    encoder.ensure_built()
    if classifier is not None:
        classifier.build()
    height, width = encoder.image_size
    images = keras.Input(shape=(height, width, 3), dtype="float32", name=INPUT_NAME)
    features = ops.cast(encoder.pooled_features(encoder(images), pooling), "float32")
    outputs = {"features": features}
    if with_classifier:
        outputs["logits"] = ops.cast(classifier.head(features), "float32")
    return keras.Model(images, outputs, name=f"{model.name}_serving")


def output_names(with_classifier):
    return ["features", "logits"] if with_classifier else ["features"]


# -- the exporters --------------------------------------------------------------------------------
def export_encoder(model_or_path, output, format="saved_model", pooling=None, with_classifier=False):
    """Exports the features (and logits) of an encoder or classifier; returns `output`.

    Args:
        model_or_path: a `Backbone`, an `ImageClassifier`, or the path of a `.keras` file of one.
        output: the SavedModel directory, or the `.onnx` file, to write (overwritten if present).
        format: `"saved_model"` or `"onnx"` (see the module docstring for the backends).
        pooling: `"cls"` or `"mean"` (ViT), `"mean"` (ResNet); default: the classifier's pooling,
            else the encoder's default (`cls` for ViT).
        with_classifier: also export the logits (needs an `ImageClassifier`).
    """
    from keras_mfm.checkpoints import load_model_file

    _check_format(format)
    source = None
    if isinstance(model_or_path, (str, os.PathLike)):
        source = os.fspath(model_or_path)
        model = load_model_file(source, "encoder")
    else:
        model = model_or_path
    split_model(model, source)  # a clear error before anything else
    serving = serving_model(model, pooling, with_classifier)  # checks pooling / with_classifier
    pooling = pooling or default_pooling(*split_model(model))
    backend = _current_backend()
    missing = missing_packages(format, backend)
    route = export_route(format, backend)
    if missing:
        where = "in a TensorFlow subprocess" if route == "tensorflow" else "natively"
        raise ExportError(
            f"Exporting {format} from the {backend} backend ({where}) needs the Python packages "
            f"{', '.join(missing)}: pip install {' '.join(missing)}."
        )
    output = os.fspath(output)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    if route == "tensorflow":
        with tempfile.TemporaryDirectory(prefix="keras_mfm_export_") as scratch:
            if source is None:
                source = os.path.join(scratch, "model.keras")
                model.save(source)
            _export_in_subprocess(source, output, format, pooling, with_classifier, "tensorflow")
        return output
    if format == "saved_model":
        serving.export(output, format="tf_saved_model", verbose=False)
    else:
        _export_onnx(serving, output, output_names(with_classifier), backend)
    return output


def _export_in_subprocess(path, output, format, pooling, with_classifier, backend):
    """`python -m keras_mfm.export path ... --backend backend` in a fresh process."""
    env = cli.child_env(backend)
    command = [sys.executable, "-m", "keras_mfm.export", path, "--format", format, "--output", output,
               "--backend", backend, "--pooling", pooling]
    if with_classifier:
        command.append("--with-classifier")
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("export: error: ")]
        detail = errors[-1][len("export: error: "):] if errors else " | ".join(lines[-3:])
        raise ExportError(f"Exporting {format} under {backend} in a subprocess failed: {detail}")


def _export_onnx(serving, output, names, backend):
    import numpy as np

    height, width = serving.inputs[0].shape[1:3]
    sample = np.zeros((2, height, width, 3), dtype="float32")  # batch 2: torch.export specialises 1
    serving(sample)  # Keras' ONNX export wants a model that has been called
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if backend == "torch":
                _export_onnx_torch(serving, output, names, sample)
            else:
                _register_tf2onnx_erfc()
                serving.export(output, format="onnx", verbose=False)
    except Exception as error:  # noqa: BLE001 - the converters raise anything
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise ExportError(f"ONNX conversion on the {backend} backend failed: {type(error).__name__}: "
                          f"{first_line}") from error
    _name_onnx_outputs(output, names)


def _export_onnx_torch(serving, output, names, sample):
    """torch.onnx's dynamo exporter with a dynamic batch axis (Keras' own torch path traces with
    TorchScript when the batch is `None`, which fails on `F.layer_norm` here)."""
    import torch

    class Serving(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, images):
            outputs = self.model(images, training=False)
            return tuple(outputs[name] for name in names)

    for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch._export"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "torchvision is not installed", ...
    module = Serving(serving).eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        module, (torch.from_numpy(sample),), dynamo=True, input_names=[INPUT_NAME], output_names=names,
        dynamic_shapes=({0: batch},), verbose=False,
    )
    program.optimize()
    program.save(output)


@functools.lru_cache(maxsize=None)
def _register_tf2onnx_erfc():
    """tf2onnx 1.17 has no handler for TF's `Erfc` (in exact GELU, `tf.nn.gelu(approximate=False)`):
    add one, `erfc(x) = 1 - erf(x)` with ONNX's `Erf` (opset 9+)."""
    import numpy as np
    from tf2onnx import utils
    from tf2onnx.handler import tf_op

    @tf_op("Erfc")
    class Erfc:  # noqa: F841 - registered by the decorator
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            output, shapes, dtypes = node.output[0], node.output_shapes, node.output_dtypes
            erf = ctx.make_node("Erf", [node.input[0]], op_name_scope=node.name)
            one = ctx.make_const(utils.make_name("erfc_one"), np.array(1, dtype=np.float32))
            ctx.remove_node(node.name)
            ctx.make_node("Sub", [one.output[0], erf.output[0]], outputs=[output], shapes=shapes, dtypes=dtypes)


def _name_onnx_outputs(path, names):
    """Names the ONNX graph's outputs `names` (in order: Keras flattens the output dict by sorted
    key, and `names` is sorted) if the converter named them otherwise."""
    import onnx

    model = onnx.load(path)
    graph = model.graph
    current = [value.name for value in graph.output]
    if len(current) != len(names):
        raise ExportError(f"The ONNX graph has outputs {current}, expected {names}.")
    if current == names:
        return
    for value, name in zip(graph.output, names):
        graph.node.append(onnx.helper.make_node("Identity", [value.name], [name], name=f"{name}_output"))
        value.name = name
    onnx.save(model, path)


# -- command line ---------------------------------------------------------------------------------
def _parser():
    parser = cli.OneLineParser(prog="export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoder", metavar="ENCODER", help="encoder.keras (train.py) or a classifier .keras")
    parser.add_argument("--format", choices=FORMATS, default="saved_model", help="default: saved_model")
    parser.add_argument("--output", required=True, help="SavedModel directory or .onnx file to write")
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="Keras backend (default: current)")
    parser.add_argument("--pooling", choices=POOLINGS, default=None,
                        help="features: cls or mean for a ViT, mean for ResNet (default: the model's)")
    parser.add_argument("--with-classifier", action="store_true",
                        help="also export the logits (ENCODER must be a classifier)")
    return parser


def _error(message):
    return cli.error_line("export", message)


def main(argv=None):
    """`keras-mfm-export` / `python -m keras_mfm.export ...`; returns the exit code (0, or 2 after a
    one-line error)."""
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args, exit_code = cli.parse_and_select_backend("keras_mfm.export", _parser(), argv,
                                                   replace_process=as_program)
    if args is None:
        return exit_code
    import keras

    from keras_mfm.checkpoints import TrainingError

    problem = cli.output_problem(args.output, "--output", folder=args.format == "saved_model")
    if problem:
        return _error(problem)
    try:
        output = export_encoder(args.encoder, args.output, format=args.format, pooling=args.pooling,
                                with_classifier=args.with_classifier)
    except (ValueError, TrainingError, ExportError, NotImplementedError) as error:
        return _error(error)
    except OSError as error:
        return _error(cli.os_error_line(error))
    outputs = " + ".join(output_names(args.with_classifier))
    route = export_route(args.format)
    via = " via tensorflow" if route == "tensorflow" else ""
    print(f"exported {outputs} of {args.encoder} as {args.format} to {output} "
          f"({keras.backend.backend()} backend{via})")
    return 0


def console_main():
    """The `keras-mfm-export` command."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
