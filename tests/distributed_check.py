"""Run by tests/test_distribution.py in a fresh process (the device count is fixed when a backend
starts): `python tests/distributed_check.py DEVICES` under KERAS_BACKEND=tensorflow|jax.

Prints one JSON line comparing, on the same global batch and initial weights,
- two training steps of MFM (the run's AdamW, schedule and a small clip norm, so that clipping acts)
  on one device and data-parallel over DEVICES virtual CPU devices: losses and weights;
- a FAMT model trained data-parallel for one epoch, whose `ImportanceRefresh` at epoch 1 scores the
  whole (unevenly batched) image set: the table against a direct call of the scorer;
- the compact table in a replicated step, as a model variable and on the host (the same losses).
"""

import json
import os
import sys

devices = int(sys.argv[1])
if os.environ.get("KERAS_BACKEND") == "jax":
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_mfm import backbones, data, distribution, methods, optimization  # noqa: E402
from keras_mfm.importance import ImportanceRefresh, ImportanceScorer  # noqa: E402
from keras_mfm.models.mae import MAE  # noqa: E402
from keras_mfm.models.token_masking import whole_image_inputs  # noqa: E402
from tests.conftest import smooth_images  # noqa: E402

BATCH, SIZE, IMAGES = 8, 16, 12


def mfm():
    keras.utils.set_random_seed(0)
    encoder = backbones.get_backbone("vit_tiny", SIZE, patch_size=4, depth=2, hidden_dim=32, num_heads=2)
    # under tf.distribute each replica draws its own masks for its share, not those one device
    # draws for the batch: a deterministic corruption (always low-pass) makes the steps comparable.
    p_low = 1.0 if keras.backend.backend() == "tensorflow" else 0.5
    model = methods.build_method("mfm", encoder, seed=0, p_low=p_low)
    model.build((None, SIZE, SIZE, 3))
    # epsilon 1e-6: with PyTorch's 1e-8 an Adam step of a weight whose gradient is ~1e-9 is ~lr
    # whatever the gradient's digits, so the reduction order of the two layouts would decide it
    recipe = optimization.Recipe(lr=1e-2, clip_norm=0.05, epsilon=1e-6)
    model.compile(optimizer=optimization.build_optimizer(model, recipe, BATCH, total_steps=4, warmup_steps=1))
    return model


def weights(model):
    return [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]


def batches(x, size):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(x).batch(size)


TENSORFLOW = keras.backend.backend() == "tensorflow"
# TensorFlow's logical CPU devices must exist before its first operation; its strategy only applies
# inside `scope()`. JAX's DataParallel applies to every model built after `setup`.
replication = distribution.setup(True, cpu_devices=devices) if TENSORFLOW else None
x = smooth_images(2 * BATCH, SIZE)
single = mfm()
start = weights(single)
single_loss = single.fit(batches(x, BATCH), epochs=1, verbose=0).history["loss"][0]

replication = replication or distribution.setup(True)
with replication.scope():
    parallel = mfm()
    distribution.clip_after_all_reduce(parallel.optimizer)  # as training.pretrain does
same_start = max(float(np.max(np.abs(a - b))) for a, b in zip(start, weights(parallel)))
parallel_loss = parallel.fit(batches(x, BATCH), epochs=1, verbose=0).history["loss"][0]
difference = max(float(np.max(np.abs(a - b))) for a, b in zip(weights(single), weights(parallel)))
moved = max(float(np.max(np.abs(a - b))) for a, b in zip(weights(single), start))

with replication.scope():
    keras.utils.set_random_seed(0)
    encoder = backbones.get_backbone("vit_tiny", SIZE, patch_size=4, depth=1, hidden_dim=32, num_heads=2,
                                     position_embedding="sincos")
    # the float32 table: the refresh's values are compared with the scorer's below
    famt = MAE(encoder, mask_ratio=0.45, throw_ratio=0.40, seed=0, importance="famt", num_images=IMAGES,
               decoder_dim=16, decoder_depth=1, decoder_heads=2, importance_storage="float32")
    famt.build((None, SIZE, SIZE, 3))
    famt.compile(optimizer=keras.optimizers.AdamW(1e-3))
images = smooth_images(IMAGES, SIZE, seed=1)
inputs = whole_image_inputs(images)
refresh = ImportanceRefresh(lambda: [(images[s:s + 5], np.arange(s, min(s + 5, IMAGES))) for s in range(0, IMAGES, 5)],
                            warmup_epochs=1, interval=1)


class ScoreDirectly(keras.callbacks.Callback):
    """Right after the refresh: the table, and the scorer called on all images at once."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            self.table = keras.ops.convert_to_numpy(self.model.importance_table)
            self.direct = keras.ops.convert_to_numpy(ImportanceScorer(self.model.encoder)(images))


recorder = ScoreDirectly()
history = famt.fit(batches(inputs, BATCH), epochs=2, callbacks=[refresh, recorder], verbose=0).history["loss"]
table, direct = recorder.table, recorder.direct


def replica_masks():
    """TensorFlow: each replica draws the MAE masks of the same images (an image repeated) in one
    step; their masked sets, and the generator state after the step (as one device's)."""
    import tensorflow as tf

    strategy = replication.strategy
    with replication.scope():
        mae = methods.build_method("mae", famt.encoder, seed=5, decoder_dim=16, decoder_depth=1, decoder_heads=2)
        mae.build((None, SIZE, SIZE, 3))
    share = np.repeat(images[:1], BATCH // replication.num_replicas, axis=0)
    values = strategy.experimental_distribute_values_from_function(lambda context: tf.constant(share))
    step = tf.function(lambda x: strategy.run(lambda y: mae.select(y).masked, args=(x,)))
    masks = [np.asarray(m).tolist() for m in strategy.experimental_local_results(step(values))]
    state = np.asarray(keras.ops.convert_to_numpy(mae.seed_generator.state)).tolist()
    # the corruption layers of MFM and the restoration baselines draw per replica too
    from keras_mfm.layers import AdditiveNoise, FrequencyMasking

    with replication.scope():
        noise, spectrum = AdditiveNoise(0.1, seed=2), FrequencyMasking(radius=2.0, p_low=0.5, seed=2)
    corrupt = tf.function(lambda x: strategy.run(lambda y: (noise(y)[0], spectrum(y)[1]), args=(x,)))
    noisy, kept = corrupt(values)
    noisy, kept = ([np.asarray(t) for t in strategy.experimental_local_results(r)] for r in (noisy, kept))
    return {"replica_masks": masks, "seed_state_after": state,
            "replica_noise_equal": bool(np.array_equal(*noisy)),
            "replica_kept_masks": [[int(np.sum(k[i])) for i in range(len(k))] for k in kept]}


masks_report = replica_masks() if TENSORFLOW else {}


def compact_table_step():
    """The default uint8 table under distribution: stored from the refresh's table, one epoch of
    importance masking (its gather inside the replicated step), the decoded maps' key error."""
    with replication.scope():
        compact = MAE(famt.encoder, mask_ratio=0.45, throw_ratio=0.40, seed=0, importance="famt", num_images=IMAGES,
                      decoder_dim=16, decoder_depth=1, decoder_heads=2)
        compact.build((None, SIZE, SIZE, 3))
        compact.compile(optimizer=keras.optimizers.AdamW(1e-3))
    compact.set_importance(table)
    initial = weights(compact)
    losses = compact.fit(batches(inputs, BATCH), epochs=1, verbose=0).history["loss"]
    decoded = keras.ops.convert_to_numpy(compact.importance_maps())
    relative = table / table.max(axis=1, keepdims=True)
    steps = keras.ops.convert_to_numpy(compact.importance_step)
    error = np.abs(np.log(decoded) - np.log(relative)) - steps[:, None] / 2
    # the same from the host table (train.py's): each batch's rows added by the input pipeline
    with replication.scope():
        host = MAE(famt.encoder, mask_ratio=0.45, throw_ratio=0.40, seed=0, importance="famt", num_images=IMAGES,
                   decoder_dim=16, decoder_depth=1, decoder_heads=2, importance_location="host")
        host.build((None, SIZE, SIZE, 3))
        host.compile(optimizer=keras.optimizers.AdamW(1e-3))
    for variable, value in zip(host.trainable_variables, initial):  # the shared encoder too
        variable.assign(value)
    host.set_importance(table)
    host_losses = host.fit(data.with_importance(batches(inputs, BATCH), host), epochs=1, verbose=0).history["loss"]
    return {"compact_dtype": str(keras.ops.convert_to_numpy(compact.importance_table).dtype),
            "compact_losses": losses, "compact_key_error_over_half_step": float(error.max()),
            "host_losses": host_losses, "host_dtype": str(host.host_table.values.dtype),
            "host_vs_compact_weights": max(float(np.max(np.abs(a - b))) for a, b in zip(weights(host),
                                                                                       weights(compact)))}


masks_report.update(compact_table_step())


def shared_inference():
    """`SharedInference` of a model that records the batch size each device computes: 7 rows on 2
    devices are shares of 4 (the last row repeated once), the outputs those of the whole batch."""
    seen = []

    class Probe(keras.Model):
        def call(self, x, training=None):
            seen.append(int(x.shape[0]))
            return x[:, :2, 0, 0] * 2.0

    with replication.scope():
        probe = Probe()
    x = smooth_images(7, SIZE, seed=3)
    out = distribution.SharedInference(probe)(x)
    return {"shared_rows_seen": sorted(set(seen)), "shared_error": float(np.max(np.abs(out - 2.0 * x[:, :2, 0, 0]))),
            "shared_shape": list(out.shape), "refresh_devices": refresh.shared.devices}


masks_report.update(shared_inference())

print(json.dumps({
    "replicas": replication.num_replicas, "kind": replication.kind,
    "same_start": same_start, "single_loss": single_loss, "parallel_loss": parallel_loss,
    "weight_difference": difference, "weights_moved": moved,
    "famt_losses": history, "refreshes": [e for e, _ in refresh.history],
    "table_rows_scored": int(np.sum(np.any(table != 1.0, axis=1))), "table_rows": int(table.shape[0]),
    "table_vs_direct": float(np.max(np.abs(table - direct))),
    **masks_report,
}))
