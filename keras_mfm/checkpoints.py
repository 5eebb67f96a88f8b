"""Crash-safe checkpoints: a run killed at any moment resumes exactly where it stopped.

A checkpoint is ONE file, `checkpoint.keras`: the whole pre-training model (weights, the AMT/FAMT
importance table, the optimizer with its step counter, hence the learning-rate schedule's position)
as `model.save` writes it, plus an entry `keras_mfm_state.json` holding what Keras does not save:

    {"epochs_done": e, "steps_done": j,      the run stopped after step j of epoch e (j = 0: epoch end)
     "epoch_loss": m,                        mean loss of those j steps (the epoch's history row)
     "rng": [[...], ...],                    every `keras.random.SeedGenerator` state of the model
     "history": [{...}, ...],                the epoch rows of history.csv so far
     "run": {"method": ..., ...}}            what it was trained as (checked against config.json on resume)

It is written to a temporary file and renamed (`os.replace`, atomic on POSIX), so the file on disk
is always a complete checkpoint: the previous one or the new one. The data a run sees is a function
of `(seed, epoch, step)` (`data.pretraining_epochs`), so the batches after a resume are those the
uninterrupted run would have seen, and the masks too (restored generator states).
"""

import contextlib
import json
import math
import os
import zipfile

import keras
import numpy as np

CHECKPOINT = "checkpoint.keras"
CHECKPOINT_STATE = "checkpoint.json"  # a human-readable copy of the state; the .keras file is the truth
STATE_ENTRY = "keras_mfm_state.json"
SEED_STATE = "seed_generator_state"


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged, or a checkpoint that cannot be used)."""


@contextlib.contextmanager
def replacing(path, temporary):
    """Write `temporary` inside the block; at its end it replaces `path` (one rename). If the block
    fails (a full disk, a kill signal turned exception), the temporary is removed and `path` keeps
    its previous content."""
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def write_json_atomically(path, values):
    with replacing(path, path + ".tmp") as temporary, open(temporary, "w") as handle:
        json.dump(values, handle, indent=2, default=str)


def save_atomically(model, path, state=None):
    """`model.save(path)` through a temporary file and a rename; `state` goes in as `STATE_ENTRY`."""
    with replacing(path, path[: -len(".keras")] + ".tmp.keras") as temporary:
        model.save(temporary)
        if state is not None:
            with zipfile.ZipFile(temporary, "a") as archive:
                archive.writestr(STATE_ENTRY, json.dumps(state))


def load_model_file(path, what="model"):
    """`keras.saving.load_model(path, safe_mode=True)` with a clear error naming the file."""
    if not os.path.isfile(path):
        raise TrainingError(f"No {what} file at {path}.")
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except Exception as error:  # noqa: BLE001 - any failure means the file is unusable
        raise TrainingError(
            f"Cannot load the {what} file {path}: it is corrupt, truncated or not a keras_mfm "
            f"file ({type(error).__name__}: {str(error)[:200]})."
        ) from error


def read_state(path):
    """The `STATE_ENTRY` of a checkpoint file, or None for a checkpoint without one."""
    try:
        with zipfile.ZipFile(path) as archive:
            if STATE_ENTRY not in archive.namelist():
                return None
            return json.loads(archive.read(STATE_ENTRY))
    except (OSError, zipfile.BadZipFile, ValueError) as error:
        raise TrainingError(f"Cannot read the checkpoint file {path}: it is corrupt or truncated ({error}).") from error


# -- random-number generator states --------------------------------------------------------------
def _seed_variables(model):
    return [v for v in model.variables if v.path.endswith(SEED_STATE)]


def rng_states(model):
    """Every SeedGenerator state of `model`, in variable order (`model.save` does not keep them)."""
    return [np.asarray(keras.ops.convert_to_numpy(v)).tolist() for v in _seed_variables(model)]


def restore_rng_states(model, states):
    variables = _seed_variables(model)
    if len(variables) != len(states):
        raise TrainingError(
            f"The checkpoint holds {len(states)} random-generator states, the model has {len(variables)}: "
            "it was written by a different model."
        )
    for variable, state in zip(variables, states):
        variable.assign(np.asarray(state, dtype=variable.dtype))


def sync_model_state(model):
    """On JAX, `fit` keeps the variables outside the model during an epoch: write them back."""
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def load_checkpoint(path):
    """`(model, state)` of a checkpoint file, the generator states restored; a checkpoint without
    a state entry (an older run) counts as the end of the epoch in `checkpoint.json`."""
    model = load_model_file(path, "checkpoint")
    state = read_state(path)
    if state is None:
        legacy = os.path.join(os.path.dirname(path), CHECKPOINT_STATE)
        with open(legacy) as handle:
            state = {"epochs_done": int(json.load(handle)["epochs_done"]), "steps_done": 0, "rng": None}
    if state.get("rng") is not None:
        restore_rng_states(model, state["rng"])
    return model, state


# -- callbacks -------------------------------------------------------------------------------------
class EpochProgress:
    """Where an epoch resumed: `steps` done before this process and their mean `loss`."""

    def __init__(self, epoch=None, steps=0, loss=0.0):
        self.epoch, self.steps, self.loss = epoch, int(steps), float(loss)

    def offset(self, epoch):
        return (self.steps, self.loss) if epoch == self.epoch else (0, 0.0)


class ResumedEpochLoss(keras.callbacks.Callback):
    """After a resume in the middle of epoch `e`, Keras' epoch loss covers only the steps run in
    this process: make it the mean over the whole epoch, as the uninterrupted run logs it.
    Runs first among the callbacks, so history, checkpoints and TerminateOnNaN see the whole epoch."""

    def __init__(self, progress, steps_per_epoch):
        super().__init__()
        self.progress = progress
        self.steps_per_epoch = steps_per_epoch

    def on_epoch_end(self, epoch, logs=None):
        done, mean = self.progress.offset(epoch)
        if done and logs and "loss" in logs:
            logs["loss"] = (mean * done + float(logs["loss"]) * (self.steps_per_epoch - done)) / self.steps_per_epoch


HISTORY = "history.csv"


def write_history(directory, rows):
    """`directory/history.csv` from the epoch rows (dicts with "epoch"), atomically: the columns
    `epoch` then every other key, sorted (as Keras' CSVLogger)."""
    keys = sorted({key for row in rows for key in row} - {"epoch"})
    path = os.path.join(directory, HISTORY)
    with replacing(path, path + ".tmp") as temporary, open(temporary, "w") as handle:
        handle.write(",".join(["epoch", *keys]) + "\n")
        for row in rows:
            handle.write(",".join([str(int(row["epoch"])), *(repr(float(row[k])) if k in row else "" for k in keys)])
                         + "\n")


class AtomicCheckpoint(keras.callbacks.Callback):
    """Writes `checkpoint.keras` (with its state) after every epoch and, with `every_steps`, every
    that many steps inside an epoch; never with a non-finite loss, so the last good one stays.

    The epoch rows of history.csv travel inside the checkpoint's state, and the CSV is rewritten from
    them after each epoch's checkpoint: a kill between the two loses no row (a resume rewrites the
    CSV from the checkpoint). `history`: the rows of the epochs before this process (a resume).
    `run`: what the checkpoint was trained as (method, encoder, data size), checked on resume.
    """

    def __init__(self, directory, steps_per_epoch, every_steps=None, progress=None, history=(), run=None):
        super().__init__()
        self.run = run
        self.directory = directory
        self.steps_per_epoch = steps_per_epoch
        self.every_steps = every_steps
        self.progress = progress or EpochProgress()
        self.history = [dict(row) for row in history]

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if not self.every_steps or not logs or "loss" not in logs:
            return
        done, mean = self.progress.offset(self.epoch)
        steps = done + batch + 1  # steps of this epoch done so far
        if steps % self.every_steps or steps >= self.steps_per_epoch:
            return  # the epoch-end checkpoint covers the last step
        running = (mean * done + float(logs["loss"]) * (batch + 1)) / steps
        self.save(self.epoch, steps, running)

    def on_epoch_end(self, epoch, logs=None):
        if not logs or "loss" not in logs or not math.isfinite(float(logs["loss"])):
            return
        row = {"epoch": epoch}
        for key, value in logs.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                continue  # not a number: not a history column
        self.history = [r for r in self.history if r["epoch"] < epoch] + [row]
        self.save(epoch + 1, 0, float(logs["loss"]))
        write_history(self.directory, self.history)

    def save(self, epochs_done, steps_done, loss):
        if not math.isfinite(loss):
            return
        sync_model_state(self.model)
        state = {"epochs_done": epochs_done, "steps_done": steps_done, "epoch_loss": loss,
                 "rng": rng_states(self.model), "history": self.history, "run": self.run}
        save_atomically(self.model, os.path.join(self.directory, CHECKPOINT), state)
        write_json_atomically(os.path.join(self.directory, CHECKPOINT_STATE),
                              {key: value for key, value in state.items() if key not in ("rng", "history")})


LOCK = ".keras_mfm.lock"


class RunLock:
    """Marks a run folder as being written by this process (`OUTPUT/.keras_mfm.lock`: host and pid),
    so that a second run into the same folder stops at once instead of interleaving its files. A lock
    left by a process that no longer runs on this host (a killed run) is taken over."""

    def __init__(self, directory):
        self.path = os.path.join(directory, LOCK)
        self.held = False

    def acquire(self):
        import socket

        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._owner()
                if owner and owner.get("host") == me["host"] and not _alive(owner.get("pid")):
                    os.remove(self.path)  # stale: its process is gone
                    continue
                who = f"process {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
                raise RunFolderError(
                    f"{os.path.dirname(self.path)} is being written by {who} (lock file {self.path}); wait for it, "
                    "or use another --output. If no run is writing it, delete the lock file."
                ) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return self
        raise RunFolderError(f"Cannot lock the run folder {os.path.dirname(self.path)}.")

    def _owner(self):
        try:
            with open(self.path) as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def release(self):
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class RunFolderError(RuntimeError):
    """A run folder that cannot be written as asked (locked, or holding another run)."""


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # exists but not ours, or unreadable: assume alive
    return True
