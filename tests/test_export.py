"""keras_mfm.export: the exported SavedModel / ONNX artifacts, run in a FRESH process (TensorFlow or
onnxruntime, no keras_mfm), give the in-memory encoder's pooled features (and classifier logits) to
1e-4, for batches of 3 and 5 (the batch axis is free); bad inputs give clear errors.

To stay fast, the default tests export a tiny ViT and a classifier once (module fixture): the
SavedModels, then the ONNX files; each format is checked by one fresh process that runs while the
next exports (exports that are child processes themselves, on the backends that re-open the model
under TensorFlow, run two at a time). The ResNet-50 check is `slow`.
"""

import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import types

import keras
import numpy as np
import pytest

from keras_mfm import export, methods
from keras_mfm.backbones import ResNetBackbone, ViTBackbone
from keras_mfm.checkpoints import TrainingError
from keras_mfm.models import ImageClassifier
from tests.conftest import BACKEND, REPO, to_numpy

TOLERANCE = 1e-4
BATCHES = (3, 5)

# Runs in a fresh process: loads each artifact with TensorFlow / onnxruntime (no keras_mfm), runs it
# on the saved inputs and reports the max abs error of every output against the saved expectation.
VERIFY = r"""
import json, sys
import numpy as np

results = {}
for item in json.load(open(sys.argv[1])):
    try:
        if item["format"] == "saved_model":
            import tensorflow as tf
            loaded = tf.saved_model.load(item["path"])
            run = lambda x: {k: v.numpy() for k, v in loaded.serve(tf.constant(x)).items()}
        else:
            import onnxruntime
            session = onnxruntime.InferenceSession(item["path"], providers=["CPUExecutionProvider"])
            assert [i.name for i in session.get_inputs()] == ["images"], session.get_inputs()
            names = [o.name for o in session.get_outputs()]
            run = lambda x: dict(zip(names, session.run(None, {"images": x})))
        rows = []
        for batch in item["batches"]:
            outputs = run(np.load(batch["images"]))
            row = {"keys": sorted(outputs)}
            for key, path in batch["expected"].items():
                expected = np.load(path)
                row[key] = {"shape": list(outputs[key].shape),
                            "max_abs_error": float(np.max(np.abs(outputs[key] - expected)))}
            rows.append(row)
        results[item["name"]] = rows
    except Exception as error:
        results[item["name"]] = f"{type(error).__name__}: {error}"
print("RESULTS " + json.dumps(results))
"""


def tiny_vit():
    return ViTBackbone(image_size=16, patch_size=4, hidden_dim=32, depth=1, num_heads=2)


def tiny_classifier(encoder, seed=0):
    """A classifier whose head has O(1) weights (its init, std 2e-5, gives ~1e-5 logits: too
    small for a 1e-4 comparison to mean anything)."""
    classifier = ImageClassifier(encoder, num_classes=3)
    classifier.build()
    rng = np.random.default_rng(seed)
    for variable in classifier.head.layers[-1].weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return classifier


def onnx_skip_reason():
    missing = export.missing_packages("onnx")
    route = export.export_route("onnx")
    if missing:
        where = " (re-opened under TensorFlow)" if route == "tensorflow" else ""
        return f"ONNX export from the {BACKEND} backend{where} needs {', '.join(missing)}, not installed"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime (needed to check the ONNX file) is not installed"
    return None


def write_case(directory, name, fmt, path, expected_fn, size):
    """Saves inputs (batches of 3 and 5) and `expected_fn(x)` -> {output: array} as .npy files; returns
    the verifier's manifest entry. The in-memory model runs once, on the 8 images (on JAX every new
    batch size costs seconds of op compilation); its rows are independent of the batch."""
    x = np.random.default_rng(sum(BATCHES)).uniform(size=(sum(BATCHES), size, size, 3)).astype("float32")
    outputs = expected_fn(x)
    batches, start = [], 0
    for n in BATCHES:
        images = os.path.join(directory, f"{name}_images_{n}.npy")
        np.save(images, x[start:start + n])
        expected = {}
        for key, value in outputs.items():
            expected[key] = os.path.join(directory, f"{name}_{key}_{n}.npy")
            np.save(expected[key], value[start:start + n])
        batches.append({"images": images, "expected": expected})
        start += n
    return {"name": name, "format": fmt, "path": path, "batches": batches}


def start_verifying(directory, tag, manifest):
    """Starts VERIFY on `manifest` in a fresh process (in the background: it overlaps the exports
    still to do); `finish_verifying` collects its results."""
    manifest_path = os.path.join(directory, f"manifest_{tag}.json")
    with open(manifest_path, "w") as handle:
        json.dump(manifest, handle)
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-c", VERIFY, manifest_path], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_verifying(process):
    """{name: rows or an error string} of a `start_verifying` process."""
    stdout, stderr = process.communicate(timeout=600)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULTS ")]
    assert process.returncode == 0 and lines, stdout[-2000:] + stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS "):])


def verify(directory, manifest):
    return finish_verifying(start_verifying(directory, "all", manifest))


def assert_matches(rows, outputs):
    assert isinstance(rows, list), rows  # else the verifier's error message
    for n, row in zip(BATCHES, rows):
        assert row["keys"] == sorted(outputs), row
        for key, width in outputs.items():
            assert row[key]["shape"] == [n, width], (key, row)
            assert row[key]["max_abs_error"] < TOLERANCE, (key, row)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every default-test artifact, exported once; `results[name]` is what the fresh process saw,
    `errors[name]` the exception of an export that failed."""
    directory = str(tmp_path_factory.mktemp("export"))
    keras.utils.set_random_seed(0)
    encoder = tiny_vit()
    classifier = tiny_classifier(encoder)
    classifier_file = os.path.join(directory, "classifier.keras")
    classifier.save(classifier_file)

    def vit_features(x):
        return {"features": to_numpy(encoder.pooled_features(encoder(x)))}

    def classifier_outputs(x):
        return {"features": to_numpy(classifier.features(x)), "logits": to_numpy(classifier(x))}

    def cli(args):
        code = export.main(args)
        assert code == 0, f"export.main({args}) returned {code}"

    jobs = {  # name: (format, path, export, expected outputs)
        "vit_saved_model": ("saved_model", "vit_sm", lambda path: export.export_encoder(encoder, path),
                            vit_features),
        "classifier_saved_model": ("saved_model", "classifier_sm", lambda path: cli(
            [classifier_file, "--format", "saved_model", "--output", path, "--with-classifier"]), classifier_outputs),
    }
    if onnx_skip_reason() is None:
        jobs["vit_onnx"] = ("onnx", "vit.onnx", lambda path: export.export_encoder(encoder, path, format="onnx"),
                            vit_features)
        jobs["classifier_onnx"] = ("onnx", "classifier.onnx", lambda path: export.export_encoder(
            classifier_file, path, format="onnx", with_classifier=True), classifier_outputs)
    errors, results, verifiers = {}, {}, []
    for stage in ("saved_model", "onnx"):  # each stage's check runs while the next stage exports
        names = [name for name, job in jobs.items() if job[0] == stage]

        def attempt(name):
            try:
                jobs[name][2](os.path.join(directory, jobs[name][1]))
            except Exception as error:  # noqa: BLE001 - reported by the test of this artifact
                errors[name] = error

        if export.export_route(stage) == "tensorflow":  # exported by child processes: run them together
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(names)) as pool:
                list(pool.map(attempt, names))
        else:
            for name in names:
                attempt(name)
        manifest = [write_case(directory, name, stage, os.path.join(directory, jobs[name][1]), jobs[name][3], 16)
                    for name in names if name not in errors]
        if manifest:
            verifiers.append(start_verifying(directory, stage, manifest))
    for process in verifiers:
        results.update(finish_verifying(process))
    return types.SimpleNamespace(results=results, errors=errors, directory=directory)


def result_of(exported, name):
    if name in exported.errors:
        raise exported.errors[name]
    return exported.results[name]


@pytest.mark.slow_on("jax", "tensorflow")  # end to end: XLA / graph tracing make it 2-8x the PyTorch time
# -- the artifacts --------------------------------------------------------------------------------
def test_vit_saved_model_gives_the_encoder_features_in_a_fresh_process(exported):
    assert_matches(result_of(exported, "vit_saved_model"), {"features": 32})


def test_classifier_saved_model_with_logits_from_the_cli(exported):
    assert_matches(result_of(exported, "classifier_saved_model"), {"features": 32, "logits": 3})


def test_vit_onnx_gives_the_encoder_features_in_onnxruntime(exported):
    reason = onnx_skip_reason()
    if reason:
        pytest.skip(reason)
    assert_matches(result_of(exported, "vit_onnx"), {"features": 32})


def test_classifier_onnx_with_logits_from_a_keras_file(exported):
    reason = onnx_skip_reason()
    if reason:
        pytest.skip(reason)
    assert_matches(result_of(exported, "classifier_onnx"), {"features": 32, "logits": 3})


@pytest.mark.slow
def test_resnet50_exports_to_every_supported_format(tmp_path):
    keras.utils.set_random_seed(0)
    encoder = ResNetBackbone(image_size=32)
    directory = str(tmp_path)

    def features(x):
        return {"features": to_numpy(encoder.pooled_features(encoder(x)))}

    manifest = []
    formats = ["saved_model"] + ([] if onnx_skip_reason() else ["onnx"])
    for fmt in formats:
        path = os.path.join(directory, "resnet.onnx" if fmt == "onnx" else "resnet_sm")
        export.export_encoder(encoder, path, format=fmt)
        manifest.append(write_case(directory, f"resnet_{fmt}", fmt, path, features, 32))
    results = verify(directory, manifest)
    for fmt in formats:
        assert_matches(results[f"resnet_{fmt}"], {"features": 2048})


def test_export_routes_follow_the_backend():
    assert export.export_route("saved_model", "tensorflow") == "native"
    assert export.export_route("saved_model", "jax") == "native"
    assert export.export_route("saved_model", "torch") == "tensorflow"
    assert export.export_route("onnx", "tensorflow") == "native"
    assert export.export_route("onnx", "torch") == "native"
    assert export.export_route("onnx", "jax") == "tensorflow"


# -- bad input ------------------------------------------------------------------------------------
def test_a_pretraining_model_is_refused(tmp_path):
    model = methods.build_method("mfm", tiny_vit())
    with pytest.raises(ValueError, match=r"MFM 'mfm' is not an encoder or classifier; export the encoder "
                                         r"\(runs/NAME/encoder.keras\), or pass its `.encoder`"):
        export.export_encoder(model, str(tmp_path / "out"))


def test_a_dense_layer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Dense 'dense_layer' is not an encoder or classifier"):
        export.export_encoder(keras.layers.Dense(3, name="dense_layer"), str(tmp_path / "out"))


def test_a_missing_file_is_reported(tmp_path):
    missing = str(tmp_path / "nope.keras")
    with pytest.raises(TrainingError, match=f"No encoder file at {missing}"):
        export.export_encoder(missing, str(tmp_path / "out"))


def test_a_truncated_file_is_reported(tmp_path):
    path = str(tmp_path / "encoder.keras")
    encoder = tiny_vit()
    encoder.ensure_built()
    encoder.save(path)
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(TrainingError, match="Cannot load the encoder file .*corrupt, truncated"):
        export.export_encoder(path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_bad_options_are_reported(tmp_path):
    encoder = tiny_vit()
    with pytest.raises(ValueError, match="Unknown export format 'tflite'"):
        export.export_encoder(encoder, str(tmp_path / "out"), format="tflite")
    with pytest.raises(ValueError, match="Unknown pooling 'max'"):
        export.export_encoder(encoder, str(tmp_path / "out"), pooling="max")
    with pytest.raises(ValueError, match="with_classifier needs an ImageClassifier"):
        export.export_encoder(encoder, str(tmp_path / "out"), with_classifier=True)
    classifier = ImageClassifier(encoder, num_classes=3)  # mean pooling
    with pytest.raises(ValueError, match="head reads 'mean'-pooled features; pooling 'cls'"):
        export.export_encoder(classifier, str(tmp_path / "out"), pooling="cls", with_classifier=True)
    assert not os.path.exists(tmp_path / "out")


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "nope.keras")
    assert export.main([missing, "--output", out]) == 2
    assert error_line(capsys) == f"export: error: No encoder file at {missing}."

    dense = str(tmp_path / "dense.keras")
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="seq").save(dense)
    assert export.main([dense, "--output", out, "--format", "saved_model"]) == 2
    assert error_line(capsys) == (f"export: error: {dense} holds a Sequential 'seq', which is not an encoder or "
                                  "classifier; export the encoder (runs/NAME/encoder.keras).")

    assert export.main([missing, "--output", out, "--format", "tflite"]) == 2
    assert error_line(capsys).startswith("export: error: argument --format: invalid choice: 'tflite'")
    assert export.main([missing]) == 2
    assert error_line(capsys) == "export: error: the following arguments are required: --output"
    assert not os.path.exists(out)


def test_cli_backend_switch_reruns_in_a_fresh_process(tmp_path, capfd):
    """Keras is already imported here, under BACKEND: `--backend OTHER` re-runs the command in a new
    process (`python -m keras_mfm.export ...` with KERAS_BACKEND=OTHER), whose error line and exit
    code come back."""
    other = "torch" if BACKEND == "jax" else "jax"
    missing = str(tmp_path / "nope.keras")
    assert export.main([missing, "--output", str(tmp_path / "out"), "--backend", other]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("export:")]
    assert err == [f"export: error: No encoder file at {missing}."]
