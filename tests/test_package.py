"""The installable package: pyproject.toml's entry points and extras, and (slow) a real install
into a fresh virtual environment, used from outside the repository."""

import importlib
import os
import subprocess
import sys
import tomllib

import pytest

import keras_mfm
from keras_mfm.cli import PACKAGE_ROOT

PYPROJECT = os.path.join(PACKAGE_ROOT, "pyproject.toml")


def project():
    with open(PYPROJECT, "rb") as handle:
        return tomllib.load(handle)["project"]


def test_console_scripts_point_at_callables():
    scripts = project()["scripts"]
    assert set(scripts) == {"keras-mfm-train", "keras-mfm-eval", "keras-mfm-export", "keras-mfm-convert"}
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_extras_and_licence():
    extras = project()["optional-dependencies"]
    assert {"tensorflow", "jax", "torch", "export", "tensorboard", "safetensors", "all", "dev"} <= set(extras)
    assert "pytest" in " ".join(extras["dev"])
    assert any(dep.startswith("keras>=3.15") for dep in project()["dependencies"])
    assert project()["license"] == {"text": "Apache-2.0"}
    assert "Apache License" in open(os.path.join(PACKAGE_ROOT, "LICENSE")).read()
    assert keras_mfm.__version__.count(".") == 2


@pytest.mark.slow
def test_install_into_a_fresh_venv_and_use_it_from_elsewhere(tmp_path):
    """`pip install .` into a venv (its dependencies from this machine's site-packages, no network),
    then `import keras_mfm` and `keras-mfm-train --help` from a folder outside the repository."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", "--no-index", PACKAGE_ROOT],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    found = subprocess.run([python, "-c", "import keras_mfm, os; print(keras_mfm.__version__, keras_mfm.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert found.returncode == 0, found.stderr[-3000:]
    version, location = found.stdout.split()
    assert version == keras_mfm.__version__ and str(venv) in location  # the installed copy, not the clone
    for script in ("keras-mfm-train", "keras-mfm-eval", "keras-mfm-export", "keras-mfm-convert"):
        result = subprocess.run([str(venv / "bin" / script), "--help"], capture_output=True, text=True,
                                cwd=tmp_path, env=env)
        assert result.returncode == 0 and "usage:" in result.stdout, (script, result.stderr[-2000:])
