"""Pre-training runs: data -> model -> `model.fit` -> encoder, checkpoints, history.

`PretrainConfig` (`keras_mfm.settings`) holds every setting of a run (`train.py`'s flags);
`pretrain(config)` performs it and writes into `config.output`:

- `encoder.keras`: the encoder alone (`keras.saving.load_model` on any backend, after
  `import keras_mfm`); it takes NHWC images in [0, 1];
- `config.json`: the run's settings, backend, data and timing;
- `history.csv`: per-epoch loss, learning rate, seconds and images/s;
- `checkpoint.keras`: the whole model with its optimizer state, random-generator states and the
  run's position, written atomically after every epoch (and every `checkpoint_steps` steps);
  `resume(output)` continues from it exactly (`keras_mfm.checkpoints`); `checkpoint.json` is a
  readable copy of the position.
"""

import csv
import json
import math
import os
import time
import warnings

import keras
import numpy as np

from keras_mfm import backbones, data, distribution, inputs, methods
from keras_mfm.optimizers import recipes
from keras_mfm.layers.initializers import INIT_SCHEMES
from keras_mfm.settings import PretrainConfig  # noqa: F401 - the run's settings, re-exported
from keras_mfm.checkpoints import (  # noqa: F401 - re-exported: the run's file helpers
    CHECKPOINT,
    CHECKPOINT_STATE,
    AtomicCheckpoint,
    EpochProgress,
    ResumedEpochLoss,
    RunFolderError,
    RunLock,
    TrainingError,
    load_checkpoint,
    load_model_file,
    replacing,
    save_atomically,
    write_history,
    write_json_atomically,
)

ENCODER = "encoder.keras"
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def build_encoder(config):
    """The encoder of `config`, with its method's authors' settings (init scheme, position
    embedding, SimMIM's layer scale and drop path) unless `config.init` overrides the scheme."""
    method = methods.get_method(config.method)
    if method.tokens and not config.backbone.startswith("vit"):
        raise ValueError(f"--method {config.method} needs a ViT backbone (patch tokens), not {config.backbone!r}.")
    overrides = methods.encoder_defaults(config.method, config.backbone)
    if config.depth is not None:
        overrides["depth"] = config.depth
    if config.init is not None and config.backbone.startswith("vit"):
        overrides["init"] = config.init
    patch = config.patch_size if config.backbone.startswith("vit") else None
    return backbones.get_backbone(config.backbone, config.image_size, patch_size=patch, **overrides)


def recipe_of(config):
    """The `recipes.Recipe` of `config`: the method's authors' recipe (or `config.recipe`),
    with the settings `config` gives (`min_lr` is absolute there, per reference batch in a recipe)."""
    recipe = recipes.get_recipe(config.recipe or methods.get_method(config.method).recipe)
    min_lr = None if config.min_lr is None else config.min_lr * recipe.reference_batch_size / config.batch_size
    return recipes.get_recipe(
        recipe.name, base_lr=config.base_lr, lr=config.lr, min_lr=min_lr, weight_decay=config.weight_decay,
        clip_norm=config.clip_norm,
    )


def refresh_schedule(config):
    """`(warm-up epochs, interval)` of the importance refreshes (SPEC: epoch 40 of 400, every 40)."""
    default = max(1, int(round(config.epochs / 10)))
    warmup = default if config.refresh_warmup is None else config.refresh_warmup
    interval = default if config.refresh_interval is None else config.refresh_interval
    return warmup, interval


def build_model(config, num_images=None):
    """The pre-training model of `config` (built, not compiled); `num_images`: AMT/FAMT's table."""
    encoder = build_encoder(config)
    options = methods.method_options(config.method, config)
    if methods.get_method(config.method).importance:
        options["num_images"] = num_images
    model = methods.build_method(config.method, encoder, **options)
    model.build((None, *encoder.image_size, 3))
    return model


def eval_protocols(config):
    """`config.eval` as a list of frozen-encoder protocols ("none" -> [])."""
    if config.eval in (None, "", "none"):
        return []
    return [name.strip() for name in config.eval.split(",") if name.strip()]


def validate(config):
    """Cheap checks before any data is read, so a typo fails in a second with a clear message."""
    for name in ("epochs", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}.")
    if config.eval != "none" and not set(eval_protocols(config)) <= {"knn", "linear"}:
        raise ValueError(f"Unknown --eval {config.eval!r}; choose knn, linear, knn,linear or none.")
    if config.monitor_knn is not None and config.monitor_knn < 1:
        raise ValueError(f"--monitor-knn must be >= 1 epoch, got {config.monitor_knn}.")
    if config.steps_per_epoch is not None and config.steps_per_epoch < 1:
        raise ValueError(f"--steps-per-epoch must be >= 1, got {config.steps_per_epoch}.")
    for name in ("base_lr", "lr"):
        if getattr(config, name) is not None and not getattr(config, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(config, name)}.")
    for name in ("min_lr", "warmup_epochs", "weight_decay", "clip_norm"):  # 0 is allowed: none / off
        if getattr(config, name) is not None and not getattr(config, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}.")
    if config.warmup_epochs is not None and config.warmup_epochs > config.epochs:
        raise ValueError(f"--warmup-epochs {config.warmup_epochs} is longer than the run (--epochs {config.epochs}).")
    if not config.gamma > 0:
        raise ValueError(f"--gamma must be > 0 (the exponent of the frequency distance; 1: the plain frequency "
                         f"loss), got {config.gamma}.")
    methods.get_method(config.method)  # ValueError naming the registered methods
    if config.recipe is not None and config.recipe not in recipes.RECIPES:
        raise ValueError(f"Unknown --recipe {config.recipe!r}; choose one of "
                         f"{', '.join(sorted(recipes.RECIPES))}.")
    if config.init is not None and config.init not in INIT_SCHEMES:
        raise ValueError(f"Unknown --init {config.init!r}; choose one of {', '.join(INIT_SCHEMES)}.")
    if config.precision not in PRECISIONS:
        raise ValueError(f"Unknown --precision {config.precision!r}; choose one of {', '.join(PRECISIONS)}.")
    recipe = recipe_of(config)
    peak, floor = recipe.learning_rate(config.batch_size), recipe.scaled(recipe.min_lr, config.batch_size)
    if floor > peak:
        raise ValueError(f"--min-lr {floor:g} is above the peak learning rate {peak:g} (--lr, or --base-lr x batch / "
                         f"{recipe.reference_batch_size}); the schedule decays from the peak to --min-lr.")
    if config.backbone not in backbones.BACKBONE_PRESETS:
        raise ValueError(
            f"Unknown backbone {config.backbone!r}; choose one of {sorted(backbones.BACKBONE_PRESETS)}."
        )
    if methods.get_method(config.method).importance:
        warmup, interval = refresh_schedule(config)
        if warmup < 1 or interval < 1:
            raise ValueError(
                f"--refresh-warmup must be >= 1 (the importance needs a trained encoder) and --refresh-interval "
                f">= 1; got {warmup} and {interval}."
            )
        if warmup >= config.epochs:
            warnings.warn(
                f"--refresh-warmup {warmup} >= --epochs {config.epochs}: the importance is never refreshed, "
                f"so this {config.method} run keeps random masking.", stacklevel=2,
            )
    if config.backbone.startswith("vit") and config.image_size % config.patch_size:
        raise ValueError(
            f"Image size {config.image_size} is not divisible by the patch size {config.patch_size}."
        )


# -- callbacks -----------------------------------------------------------------------------------
class EpochStats(keras.callbacks.Callback):
    """Adds `lr`, `epoch_seconds` and `images_per_second` to the epoch logs (before CSVLogger)."""

    def __init__(self, batch_size):
        super().__init__()
        self.batch_size = batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._start
        if logs is not None:
            # With a schedule, `optimizer.learning_rate` is its value at the current step.
            logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            logs["epoch_seconds"] = seconds
            logs["images_per_second"] = self._batches * self.batch_size / seconds


def _read_history_rows(path):
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _read_history_numbers(path):
    """history.csv's rows as numbers (a checkpoint without rows inside: an older version's run)."""
    rows = []
    for row in _read_history_rows(path):
        values = {}
        for key, value in row.items():
            try:
                values[key] = float(value)
            except (TypeError, ValueError):
                continue
        values["epoch"] = int(row["epoch"])
        rows.append(values)
    return rows


def _learning_rate_record(optimizer):
    """The learning rate as configured, for config.json: the schedule's serialised config (class
    and arguments: peak, warm-up, decay steps) or the constant (`optimizer.learning_rate` is only
    the current value)."""
    value = recipes.base_optimizer(optimizer).get_config()["learning_rate"]
    return value if isinstance(value, (dict, int, float)) else float(keras.ops.convert_to_numpy(value))


def _truncate_history(path, epochs):
    """Keep the first `epochs` rows of history.csv (a crashed run may have logged a later one)."""
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        lines = handle.read().splitlines(keepends=True)
    header, rows = lines[:1], [line for line in lines[1:] if line.strip()]
    with replacing(path, path + ".tmp") as temporary, open(temporary, "w") as handle:
        handle.writelines(header + rows[:epochs])


# -- the run -------------------------------------------------------------------------------------
RUN_FILES = ("config.json", "history.csv", CHECKPOINT, ENCODER, "metrics.json")


def pretrain(config, callbacks=(), overwrite=False):
    """Runs the pre-training of `config`; returns a summary dict. `callbacks`: more Keras callbacks
    for every epoch's `fit` (after the library's own, before the checkpoint). A `config.output` that
    already holds a run is refused unless `overwrite` (then its run files are replaced)."""
    return _run(config, resume=False, extra_callbacks=callbacks, overwrite=overwrite)


def recorded_run(output):
    """The `config.json` record of the run in `output` (TrainingError when there is none)."""
    path = os.path.join(output, "config.json")
    if not os.path.isfile(path):
        raise TrainingError(f"Nothing to resume in {output}: no config.json.")
    try:
        with open(path) as handle:
            info = json.load(handle)
        info["config"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TrainingError(f"Cannot resume {output}: {path} is not a keras_mfm run record ({error}).") from None
    return info


def resume(output, callbacks=()):
    """Continues the run in `output` from its last checkpoint, with its own saved settings, on the
    backend it was trained on (another backend draws other random streams: refused)."""
    info = recorded_run(output)
    backend = info.get("backend")
    if backend and backend != keras.backend.backend():
        raise TrainingError(
            f"The run in {output} was trained on the {backend} backend, this process runs "
            f"{keras.backend.backend()}: resume it with --backend {backend} (KERAS_BACKEND={backend})."
        )
    config = PretrainConfig.from_json(info["config"])
    config.output = output
    return _run(config, resume=True, extra_callbacks=callbacks)


#: the settings that make a checkpoint another model: a resume with any of them changed is refused
RUN_RECORD = ("method", "backbone", "depth", "image_size", "patch_size")


def run_record(config, train_images):
    """What a run's checkpoint is, written into it and checked on resume (`check_checkpoint_matches`)."""
    record = {name: getattr(config, name) for name in RUN_RECORD}
    record["train_images"] = int(train_images)
    return record


def check_checkpoint_matches(path, recorded, expected):
    """TrainingError naming each difference when the checkpoint at `path` was trained as another run
    than `expected` (`run_record`); a checkpoint without a record (an older one) is not checked."""
    if not recorded:
        return
    changed = [f"{name} {recorded[name]!r} where this run has {expected[name]!r}" for name in expected
               if name in recorded and recorded[name] != expected[name]]
    if changed:
        raise TrainingError(
            f"The checkpoint {path} is not this run's: it was trained with {', '.join(changed)}. Put back the "
            "run's own checkpoint, or start a new run in another --output."
        )


def _claim_output(output, resume, overwrite):
    """Checks that a new run may write `output` (refuses another run's folder unless `overwrite`,
    then removes that run's files); raises TrainingError with what to do instead."""
    if resume:
        return
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(output, name))]
    if existing and not overwrite:
        raise TrainingError(
            f"{output} already holds a run ({', '.join(existing)}); --resume continues it, --overwrite replaces "
            "it, or choose another --output."
        )
    for name in existing + [CHECKPOINT_STATE]:
        if os.path.exists(os.path.join(output, name)):
            os.remove(os.path.join(output, name))


def _run(config, resume, extra_callbacks=(), overwrite=False):
    validate(config)
    if config.tensorboard_every is not None and config.tensorboard_every < 1:
        raise ValueError(f"--tensorboard-every must be >= 1, got {config.tensorboard_every}.")
    if config.checkpoint_steps is not None and config.checkpoint_steps < 1:
        raise ValueError(f"--checkpoint-steps must be >= 1, got {config.checkpoint_steps}.")
    previous_policy, previous_distribution = keras.config.dtype_policy(), keras.distribution.distribution()
    replication = distribution.setup(
        config.distribute, config.devices, config.cpu_devices, config.coordinator_address, config.num_processes,
        config.process_id,
    )
    replication.check_batch_size(config.batch_size)
    distribution.check_precision(config.precision)
    # The policy of the layers built from here on (a resumed model keeps the one it was saved with).
    keras.config.set_dtype_policy(config.precision)
    lock = None
    try:
        if replication.is_chief:  # only the first process writes files
            if os.path.exists(config.output) and not os.path.isdir(config.output):
                raise TrainingError(f"--output {config.output} is a file, not a folder; choose a folder.")
            os.makedirs(config.output, exist_ok=True)
            lock = RunLock(config.output).acquire()
            _claim_output(config.output, resume, overwrite)
        source = data.resolve_data(config.data, skip_unreadable=config.skip_unreadable)
        with data.undecodable_named(source):  # a truncated image: named, not a pipeline traceback
            return _train(config, source, resume, replication, list(extra_callbacks))
    except RunFolderError as error:
        raise TrainingError(str(error)) from None
    finally:
        if lock is not None:
            lock.release()
        keras.config.set_dtype_policy(previous_policy)
        keras.distribution.set_distribution(previous_distribution)


def _new_model(config, num_images, steps, total_steps):
    """The compiled pre-training model of a new run (call inside the replication scope)."""
    distribution.check_precision(keras.config.dtype_policy().name)
    model = build_model(config, num_images=num_images)
    recipe = recipe_of(config)
    warmup_epochs = config.epochs * recipe.warmup_fraction if config.warmup_epochs is None else config.warmup_epochs
    optimizer = recipes.build_optimizer(
        model, recipe, config.batch_size, total_steps, warmup_steps=int(round(warmup_epochs * steps))
    )
    # Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer (dynamic loss scaling).
    model.compile(optimizer=optimizer, jit_compile=config.jit_compile)
    return model


def _train(config, source, resume, replication, extra_callbacks=()):
    keras.utils.set_random_seed(config.seed)
    os.makedirs(config.output, exist_ok=True)

    train_split = data.load_split(source, "train")
    steps = config.steps_per_epoch or train_split.num_examples // config.batch_size
    if steps < 1:
        raise data.DataError(
            f"{train_split.num_examples} training images are fewer than one batch of {config.batch_size}."
        )
    total_steps = steps * config.epochs
    evaluation_splits = None
    if eval_protocols(config) or config.monitor_knn:  # a missing test/ split or one class: found now, not after
        from keras_mfm import evaluation

        evaluation_splits = evaluation.load_evaluation_data(source, config.eval_train_images, config.eval_test_images)

    initial_epoch, initial_step, progress, state = 0, 0, EpochProgress(), None
    checkpoint = os.path.join(config.output, CHECKPOINT)
    if resume and os.path.isfile(checkpoint):
        with replication.scope():
            model, state = load_checkpoint(checkpoint)
        if hasattr(model, "check_num_images"):  # AMT/FAMT: one importance map per training image
            model.check_num_images(train_split.num_examples)
        check_checkpoint_matches(checkpoint, state.get("run"), run_record(config, train_split.num_examples))
        recipes.exclude_from_weight_decay(model, model.optimizer, recipe_of(config).no_decay_names)
        initial_epoch, initial_step = int(state["epochs_done"]), int(state["steps_done"])
        if initial_step:
            progress = EpochProgress(initial_epoch, initial_step, state["epoch_loss"])
    else:
        with replication.scope():
            model = _new_model(config, train_split.num_examples, steps, total_steps)
    if replication.strategy is not None:
        distribution.clip_after_all_reduce(model.optimizer)

    uses_importance = methods.get_method(config.method).importance
    run_info = {
        "config": config.to_json(),
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "train_images": train_split.num_examples,
        "class_names": train_split.class_names,
        "steps_per_epoch": steps,
        "learning_rate": _learning_rate_record(model.optimizer),
        "recipe": recipe_of(config).to_json(),
        "init": getattr(model.encoder, "init", None),
        "encoder_parameters": int(model.encoder.count_params()),
        "precision": model.dtype_policy.name,
        "loss_scaling": isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer),
        "jit_compile": bool(model.jit_compile),  # "auto" resolved by Keras
        "distribution": replication.describe(),
    }
    chief = replication.is_chief  # only the first process writes files
    if chief:
        write_json_atomically(os.path.join(config.output, "config.json"), run_info)
    history_path = os.path.join(config.output, "history.csv")
    history_rows = state.get("history") if resume and state else None
    if chief:
        if history_rows is not None:  # the rows of the epochs the checkpoint holds, whatever the CSV kept
            history_rows = [row for row in history_rows if row["epoch"] < initial_epoch]
            write_history(config.output, history_rows)
        elif resume:
            _truncate_history(history_path, initial_epoch)  # a checkpoint of an older version: no rows inside
        elif os.path.isfile(history_path):
            os.remove(history_path)
    callbacks = [ResumedEpochLoss(progress, steps), EpochStats(config.batch_size)]
    refresh = None
    if uses_importance:
        from keras_mfm.importance import ImportanceRefresh

        warmup, interval = refresh_schedule(config)
        refresh = ImportanceRefresh(
            lambda: data.indexed_dataset(train_split, config.image_size, max(config.batch_size, 256)),
            warmup, interval, verbose=config.verbose,
            done_epoch=initial_epoch if initial_step else None,  # refreshed before the checkpoint
        )
        callbacks.append(refresh)  # after EpochStats: the refresh time counts in the epoch's time
    callbacks.append(keras.callbacks.TerminateOnNaN())
    if config.monitor_knn:
        from keras_mfm import evaluation

        # the same seeded images as the final k-NN (re-iterable tf.data pipelines)
        bank, held_out = evaluation_splits.datasets(model.encoder.image_size, config.batch_size)
        callbacks.append(evaluation.KNNMonitor(bank, held_out, every=config.monitor_knn, verbose=config.verbose))
    callbacks += list(extra_callbacks)
    if chief:
        callbacks.append(AtomicCheckpoint(config.output, steps, config.checkpoint_steps, progress,
                                          history=history_rows or _read_history_numbers(history_path) if resume
                                          else (), run=run_record(config, train_split.num_examples)))
    if config.tensorboard and chief:
        from keras_mfm.tensorboard import tensorboard_callbacks

        images, _ = next(iter(data.indexed_dataset(train_split, config.image_size, 4)))
        every = config.tensorboard_every or max(1, int(round(config.epochs / 10)))
        callbacks += tensorboard_callbacks(os.path.join(config.output, "tensorboard"), np.asarray(images), every,
                                           seed=config.seed, epochs=config.epochs)

    cached = train_split.dataset.cache()  # decoded once, shared by every epoch's pipeline
    start = time.perf_counter()
    # One `fit` per epoch: each epoch's batches are a function of (seed, epoch) (data.pretraining_epoch),
    # and a resume inside an epoch runs only its remaining steps.
    for epoch in range(initial_epoch, config.epochs):
        skip = initial_step if epoch == initial_epoch else 0
        batches = data.pretraining_epoch(
            train_split, config.image_size, config.batch_size, steps, epoch, seed=config.seed, skip_steps=skip,
            with_geometry=uses_importance, cached=cached,
        )
        if getattr(model, "host_table", None) is not None:  # each batch's importance rows, from the host
            batches = data.with_importance(batches, model)
        try:
            history = model.fit(
                batches, epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=steps - skip, callbacks=callbacks,
                verbose=config.verbose, shuffle=False,  # the batches are shuffled per epoch already
            )
        except inputs.ImageInputError as error:
            raise TrainingError(
                f"{error} (epoch {epoch}); training stopped. The last good checkpoint is {checkpoint}"
                + ("" if os.path.isfile(checkpoint) else " (none was written yet)") + "."
            ) from None
        loss = history.history.get("loss", [float("nan")])[-1]
        if model.stop_training or not math.isfinite(loss):
            raise TrainingError(
                f"The loss became {loss} in epoch {epoch}; training stopped. The last good checkpoint is "
                f"{checkpoint}" + ("" if os.path.isfile(checkpoint) else " (none was written yet)")
                + "; --resume continues from it. Lower --lr or check the data."
            )
    seconds = time.perf_counter() - start
    if refresh is not None:
        run_info["importance_refreshes"] = [{"epoch": e, "seconds": t} for e, t in refresh.history]

    encoder_path = os.path.join(config.output, ENCODER)
    if chief:
        save_atomically(model.encoder, encoder_path)
    rows = _read_history_rows(history_path) if os.path.isfile(history_path) else []
    run_info.update(
        {
            "pretrain_seconds": seconds,
            "epochs_done": config.epochs,
            "final_loss": float(rows[-1]["loss"]) if rows else None,
            "seconds_per_epoch": float(np.median([float(r["epoch_seconds"]) for r in rows])) if rows else None,
        }
    )
    if eval_protocols(config):
        from keras_mfm import evaluation

        run_info["evaluation"] = dict(evaluation.evaluate_frozen_on_data(
            model.encoder, source, eval_protocols(config), config.batch_size, config.eval_train_images,
            config.eval_test_images, verbose=config.verbose,
        ))
        if chief:
            write_json_atomically(os.path.join(config.output, "metrics.json"), run_info["evaluation"])
    if chief:
        write_json_atomically(os.path.join(config.output, "config.json"), run_info)
    return {"model": model, "encoder_path": encoder_path, "info": run_info}

