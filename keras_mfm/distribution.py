"""Data-parallel training on each backend's own engine (the backend-specific module of training).

| backend | one host, several devices | several hosts |
|---|---|---|
| JAX | `keras.distribution.DataParallel` over the devices | `keras.distribution.initialize` (`jax.distributed.initialize`) first, then `DataParallel` over every host's devices |
| TensorFlow | `tf.distribute.MirroredStrategy` | `tf.distribute.MultiWorkerMirroredStrategy`, cluster from `TF_CONFIG` |
| PyTorch | not supported: Keras' torch trainer runs `fit` on one device | not supported |

Semantics are those of the authors' DistributedDataParallel: `--batch-size` is the **global** batch,
split evenly over the replicas; the learning rate follows the global batch (`base_lr * batch / 512`);
each replica's loss is the mean over its share, and the gradients are averaged. Under JAX's
`DataParallel` the step is one program over the sharded global batch, so the loss *is* the global
mean; under `tf.distribute` each replica's loss is divided by the number of replicas before the
gradients are summed (`scale_loss_for_replicas`, called by every model's `compute_loss`).

Virtual CPU devices (to run the above without accelerators, e.g. in tests): `setup(..., cpu_devices=N)`
sets JAX's `XLA_FLAGS=--xla_force_host_platform_device_count=N` (`cpu_device_flags`), or splits
TensorFlow's CPU into logical devices; both must happen before the backend's first computation.
"""

import contextlib
import dataclasses
import json
import os

import keras
import numpy as np

from keras_mfm.backend import ReplicaSeedGenerator, fold_in_replica, scale_loss_for_replicas  # noqa: F401
from keras_mfm.optimizers.recipes import AdamW, base_optimizer


class DistributionError(ValueError):
    """A distribution request this backend or machine cannot honour."""


def cpu_device_flags(count, flags=None):
    """`XLA_FLAGS` value that makes JAX expose `count` CPU devices (set before JAX starts)."""
    kept = [f for f in (flags or "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={int(count)}"])


@dataclasses.dataclass
class Replication:
    """How a run is replicated. `scope()` is where models and optimizers must be created."""

    kind: str = "single"
    num_replicas: int = 1
    devices: tuple = ()
    num_processes: int = 1
    process_index: int = 0
    strategy: object = None  # the tf.distribute strategy (TensorFlow)

    @property
    def is_chief(self):
        """Only the first process writes checkpoints, logs and the encoder."""
        return self.process_index == 0

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def describe(self):
        return {"kind": self.kind, "num_replicas": self.num_replicas, "devices": list(self.devices),
                "num_processes": self.num_processes, "process_index": self.process_index}

    def check_batch_size(self, batch_size):
        if batch_size % self.num_replicas:
            raise DistributionError(
                f"The global batch size {batch_size} does not split evenly over {self.num_replicas} replicas; "
                f"use a multiple of {self.num_replicas}."
            )


def setup(distribute=False, devices=None, cpu_devices=None, coordinator_address=None, num_processes=None,
          process_id=None):
    """Sets up data-parallel training on the current backend and returns its `Replication`.

    Args:
        distribute: False -> `Replication()` (one device; the other arguments must be unset).
        devices: use only the first `devices` devices (default: all accelerators, else all CPUs).
        cpu_devices: split the CPU into this many virtual devices, before the backend's first
            computation (importing Keras runs none): TensorFlow logical devices, JAX's
            `--xla_force_host_platform_device_count` in `XLA_FLAGS` (`cpu_device_flags`).
        coordinator_address, num_processes, process_id: several hosts with JAX
            (`keras.distribution.initialize`); TensorFlow reads its cluster from `TF_CONFIG`.
    """
    backend = keras.backend.backend()
    multi_host = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not distribute:
        if devices or cpu_devices or multi_host:
            raise DistributionError("--devices, --cpu-devices and the multi-host flags need --distribute.")
        return Replication()
    if devices is not None and devices < 1:
        raise DistributionError(f"--devices must be >= 1, got {devices}.")
    if backend == "jax":
        return _setup_jax(devices, cpu_devices, coordinator_address, num_processes, process_id)
    if backend == "tensorflow":
        if multi_host:
            raise DistributionError(
                "On TensorFlow, several hosts are described by the TF_CONFIG environment variable "
                "(MultiWorkerMirroredStrategy), not by --coordinator-address/--num-processes/--process-id."
            )
        return _setup_tensorflow(devices, cpu_devices)
    raise DistributionError(
        f"--distribute is not supported on the {backend} backend: Keras' PyTorch trainer runs model.fit on "
        "one device. Use --backend jax (DataParallel) or --backend tensorflow (MirroredStrategy)."
    )


def _setup_jax(devices, cpu_devices, coordinator_address, num_processes, process_id):
    import jax

    if coordinator_address is not None or num_processes is not None or process_id is not None:
        if None in (coordinator_address, num_processes, process_id):
            raise DistributionError(
                "Several JAX hosts need all three of --coordinator-address, --num-processes and --process-id."
            )
        keras.distribution.initialize(coordinator_address, int(num_processes), int(process_id))
    if cpu_devices is not None:  # read when JAX starts its backend, on its first computation
        os.environ["XLA_FLAGS"] = cpu_device_flags(cpu_devices, os.environ.get("XLA_FLAGS"))
    available = jax.devices()
    if cpu_devices is not None and (available[0].platform != "cpu" or jax.local_device_count() != cpu_devices):
        raise DistributionError(
            f"JAX has {jax.local_device_count()} local {available[0].platform} device(s), not {cpu_devices} CPU "
            f"devices: it started before --cpu-devices could apply; set XLA_FLAGS={cpu_device_flags(cpu_devices)} "
            "before the first JAX computation."
        )
    if devices is not None:
        if jax.process_count() > 1:
            raise DistributionError("--devices selects devices on one host; with several hosts every device is used.")
        if devices > len(available):
            raise DistributionError(f"--devices {devices} asked, JAX has {len(available)}: {available}.")
        available = available[:devices]
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=available))
    return Replication("data_parallel", len(available), tuple(str(d) for d in available), jax.process_count(),
                       jax.process_index())


def _setup_tensorflow(devices, cpu_devices):
    import tensorflow as tf

    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    if cpu_devices is not None:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)
        except RuntimeError as error:  # TensorFlow already started
            if len(tf.config.list_logical_devices("CPU")) != cpu_devices:
                raise DistributionError(
                    f"TensorFlow already started with {len(tf.config.list_logical_devices('CPU'))} CPU device(s); "
                    f"--cpu-devices {cpu_devices} must be applied before its first operation ({error})."
                ) from error
    if sum(len(tasks) for tasks in cluster.values()) > 1:
        if devices is not None or cpu_devices is not None:
            raise DistributionError("With TF_CONFIG (several workers) every local device is used; drop --devices.")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = strategy.cluster_resolver
        order = [(kind, i) for kind in ("chief", "worker") for i in range(len(cluster.get(kind, [])))]
        workers, process_index = len(order), order.index((resolver.task_type, int(resolver.task_id)))
        kind = "multi_worker"
        names = (f"{workers} workers",)
    else:
        gpus = tf.config.list_logical_devices("GPU")
        local = gpus or tf.config.list_logical_devices("CPU")
        if devices is not None:
            if devices > len(local):
                raise DistributionError(
                    f"--devices {devices} asked, TensorFlow has {len(local)}: {[d.name for d in local]}."
                )
            local = local[:devices]
        names = tuple(d.name for d in local)
        strategy = tf.distribute.MirroredStrategy(list(names))
        kind, process_index, workers = "mirrored", 0, 1
    return Replication(kind, strategy.num_replicas_in_sync, names, workers, process_index, strategy)


class SharedInference:
    """Calls `model(x)` (inference) on whole batches, each data-parallel device computing only
    its share; the shares are combined so that every process gets the whole batch's outputs (NumPy).

    Every process passes the same batch. Its rows are padded to a multiple of the devices `P`
    (the last row repeated), split into `P` contiguous shares, one per device, and the outputs
    concatenated in device order (the padding dropped), so the result is that of one device on the
    whole batch, in about `1 / P` of the time:

    | backend | devices | shares run by | combined by |
    |---|---|---|---|
    | JAX | `keras.distribution.DataParallel` | `jax.shard_map` over its mesh (each device sees `(B / P, ...)`) | the sharded output; across hosts `process_allgather` |
    | TensorFlow | the `tf.distribute` strategy of `strategy_of` (a model built in its scope) | `strategy.run`, one share per replica | `strategy.gather` (all replicas and workers) |
    | one device, PyTorch | - | `model.predict_on_batch` (unchanged) | - |

    Args:
        model: a Keras model whose call maps a batch to per-row outputs (e.g. `ImportanceScorer`).
        strategy_of: TensorFlow: a model whose `distribute_strategy` to use (default: `model`'s).
    """

    def __init__(self, model, strategy_of=None):
        self.model = model
        self.backend = keras.backend.backend()
        self.strategy = None
        self.mesh = None
        self.devices = 1
        if self.backend == "tensorflow":
            strategy = getattr(strategy_of or model, "distribute_strategy", None)
            if strategy is not None and strategy.num_replicas_in_sync > 1:
                self.strategy, self.devices = strategy, strategy.num_replicas_in_sync
        elif self.backend == "jax":
            current = keras.distribution.distribution()
            if isinstance(current, keras.distribution.DataParallel) and current.device_mesh.devices.size > 1:
                self.mesh, self.axis = current.device_mesh.backend_mesh, current.batch_dim_name
                self.devices = int(current.device_mesh.devices.size)
        self._step = None
        self.share_rows = None  # rows each device computed in the last call (for checks)

    def __call__(self, batch):
        batch = np.asarray(batch)
        if self.devices == 1:
            return np.asarray(self.model.predict_on_batch(batch))
        rows = len(batch)
        share = -(-rows // self.devices)
        padded = np.concatenate([batch, np.repeat(batch[-1:], share * self.devices - rows, axis=0)])
        self.share_rows = share
        run = self._jax if self.backend == "jax" else self._tensorflow
        return run(padded)[:rows]

    def _tensorflow(self, padded):
        import tensorflow as tf

        strategy, shares = self.strategy, np.split(padded, self.devices)
        if self._step is None:
            self._step = tf.function(lambda x: strategy.run(lambda y: self.model(y), args=(x,)))
        values = strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(shares[context.replica_id_in_sync_group]))
        return np.asarray(strategy.gather(self._step(values), axis=0))

    def _jax(self, padded):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        model, spec = self.model, PartitionSpec(self.axis)
        if not model.built:  # stateless_call needs a built model (as predict_on_batch builds it)
            with keras.StatelessScope():
                model(padded[:1])
        if self._step is None:
            def share(trainable, non_trainable, x):
                return model.stateless_call(trainable, non_trainable, x)[0]

            self._step = jax.jit(jax.shard_map(share, mesh=self.mesh, in_specs=(PartitionSpec(), PartitionSpec(), spec),
                                               out_specs=spec))
        x = jax.make_array_from_callback(padded.shape, NamedSharding(self.mesh, spec), lambda index: padded[index])
        out = self._step([v.value for v in model.trainable_variables],
                         [v.value for v in model.non_trainable_variables], x)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            out = multihost_utils.process_allgather(out, tiled=True)
        return np.asarray(out)


def clip_after_all_reduce(optimizer):
    """Makes a TensorFlow optimizer clip the *summed* gradient of its replicas, as one device would.

    Keras 3's TensorFlow optimizer clips each replica's gradients (`global_clipnorm`) before it
    all-reduces them, so under `MirroredStrategy` the applied gradient is a sum of separately
    clipped parts, up to `replicas` times the clip norm (tests/distributed_check.py: without this,
    two replicas' weights ended 0.005 away from one device's after two steps that moved them
    0.010; with it, 4e-7). keras_mfm's `AdamW` (the recipes' optimizer) does it in a subclass
    override (`clip_summed_gradients`: all-reduce, then clip, then no second all-reduce); this
    turns that on for `optimizer` (or the AdamW inside a `LossScaleOptimizer`). The setting lives
    on the instance only: checkpoints keep the plain optimizer. No-op off TensorFlow.
    """
    if keras.backend.backend() != "tensorflow":
        return optimizer
    inner = base_optimizer(optimizer)
    if not isinstance(inner, AdamW):
        raise DistributionError(
            f"Clipping the summed gradient of the replicas needs keras_mfm's AdamW "
            f"(keras_mfm.optimizers.AdamW), not {type(inner).__name__}: Keras' own optimizers clip each "
            "replica's share before the all-reduce, and offer no public hook to change that."
        )
    inner.clip_summed_gradients = True
    return optimizer


def check_precision(precision):
    """Refuses a dtype policy the current backend and device cannot train in, before any model exists.

    XLA's CPU backend has no float16 x float16 -> float32 matmul (`dot_general` raises "precision
    F16_F16_F32 is not supported ... on CPU"), which Keras' JAX backend asks for under
    mixed_float16; JAX on GPUs, TensorFlow and PyTorch are fine, and mixed_bfloat16 works everywhere.
    """
    if precision == "mixed_float16" and keras.backend.backend() == "jax":
        import jax

        if jax.default_backend() == "cpu":
            raise DistributionError(
                "--precision mixed_float16 is not supported by JAX on CPU (XLA's CPU matmul has no float16 "
                "inputs with float32 accumulation); use mixed_bfloat16, or the tensorflow/torch backend."
            )
