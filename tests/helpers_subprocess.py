"""Run Python (a script or `-c` code with its arguments) under a given Keras backend, in a fresh process."""

import os
import subprocess
import sys

from tests.conftest import REPO


def run_python(args, backend, timeout=900):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
