"""What keras_mfm's command lines share (`keras-mfm-train`, `-eval`, `-export`, `-convert`, and the
`train.py` / `eval.py` scripts): one-line errors, and re-running a tool under another Keras backend
(importing keras_mfm imports Keras, so a `--backend` read after that can only take effect in a fresh
process; the scripts set it before, from the command line)."""

import argparse
import os
import subprocess
import sys

BACKENDS = ("tensorflow", "jax", "torch")
CHILD_ENV = "KERAS_MFM_CLI_CHILD"  # set in the processes started here (no re-run loops)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class UsageError(Exception):
    """A command-line usage error, printed as one line by the tool."""


class OneLineParser(argparse.ArgumentParser):
    """`ArgumentParser` whose usage errors raise `UsageError` instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message)


def positive_int(text):
    """argparse type: an integer >= 1 ("--batch-size 0" is a usage error, not a backend traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def error_line(program, message):
    """Prints `PROGRAM: error: MESSAGE` on one line to stderr; returns the exit code 2."""
    print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def os_error_line(error):
    """An `OSError` as one line naming the path: "cannot write /x/y: Permission denied"."""
    path = error.filename or ""
    reason = error.strerror or str(error)
    return f"{reason}: {path}" if path else reason


def output_problem(path, flag="--output", folder=False):
    """Why `path` cannot be written (a file, or a folder with `folder=True`), checked before any
    work is done, so that nothing computed is lost at the end; None when it can."""
    if path is None:
        return None
    path = os.path.abspath(path)
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            return f"{flag} {path} is a file, not a folder."
    elif os.path.isdir(path):
        return f"{flag} {path} is a folder; give a file name."
    ancestor = path if folder else os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"{flag} {path} cannot be written: {ancestor} is a file, not a folder."
    if not os.access(ancestor, os.W_OK):
        return f"{flag} {path} cannot be written: {ancestor} is not writable."
    return None


def child_env(backend):
    """The environment of a child keras_mfm process under `backend` (finds this package)."""
    env = dict(os.environ, KERAS_BACKEND=backend, **{CHILD_ENV: "1"})
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env


def rerun_under_backend(module, argv, backend, replace_process):
    """Runs `python -m module argv` again with KERAS_BACKEND=backend; returns its exit code.

    `replace_process`: exec (the tool was started as `python -m`), else a child process (`main`
    called from Python).
    """
    program = module.rsplit(".", 1)[-1]
    if os.environ.get(CHILD_ENV):
        return error_line(program, f"cannot switch Keras to the {backend} backend in this process "
                                   "(KERAS_BACKEND ignored?).")
    command = [sys.executable, "-m", module, *argv]
    if replace_process:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, command, child_env(backend))
    return subprocess.run(command, env=child_env(backend)).returncode


def parse_and_select_backend(module, parser, argv, replace_process):
    """Parses `argv` with `parser` (which has a `--backend` option) and puts Keras on that backend.

    Returns `(args, None)` to go on, or `(None, exit_code)`: after a one-line usage error, or when
    Keras was already loaded under another backend and the tool ran again under the asked one.
    """
    program = module.rsplit(".", 1)[-1]
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        return None, error_line(program, error)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    if args.backend and keras.backend.backend() != args.backend:
        return None, rerun_under_backend(module, argv, args.backend, replace_process)
    return args, None


def quiet_tensorflow(argv):
    """TensorFlow's C++ start-up log lines (level 2: warnings and info) hidden unless `--verbose`."""
    if "--verbose" not in argv:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
