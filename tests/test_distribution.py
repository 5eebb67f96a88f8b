"""Data-parallel training (keras_mfm.distribution, `train.py --distribute`) on two virtual CPU devices.

The device count is fixed when a backend starts, so the distributed checks run in fresh processes:
`tests/distributed_check.py` (one step against one device, FAMT refresh) and `train.py` end to end.
PyTorch has no data-parallel `fit` in Keras: there the test is the clear error.
"""

import json
import os

import keras
import numpy as np
import pytest

from keras_mfm import distribution, training
from tests.conftest import BACKEND
from tests.helpers_subprocess import run_python
from tests.test_data import write_folder

parallel_backends = pytest.mark.skipif(BACKEND == "torch", reason="Keras has no data-parallel fit on PyTorch")


@pytest.fixture(scope="module")
def distributed_report():
    """The JSON line of tests/distributed_check.py on 2 virtual devices (run once for the module)."""
    result = run_python(["tests/distributed_check.py", "2"], BACKEND)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@parallel_backends
def test_distributed_step_equals_one_device_step_and_famt_refresh_fills_the_table(distributed_report):
    report = distributed_report
    assert report["replicas"] == 2
    assert report["kind"] == ("mirrored" if BACKEND == "tensorflow" else "data_parallel")
    assert report["same_start"] == 0.0
    # same global batch of 8, same weights: the loss and the updated weights (AdamW, warm-up, and a
    # clip norm small enough to act) agree with one device's
    np.testing.assert_allclose(report["parallel_loss"], report["single_loss"], rtol=1e-5)
    assert report["weights_moved"] > 1e-3  # the steps did something
    assert report["weight_difference"] < 1e-5, report
    # FAMT under distribution: the refresh scores every image (12 in batches of 5: an uneven last
    # batch) and the table is what the scorer gives for them
    assert report["refreshes"] == [1]
    assert report["table_rows_scored"] == report["table_rows"] == 12
    assert report["table_vs_direct"] < 1e-5
    assert np.all(np.isfinite(report["famt_losses"]))
    # the default uint8 table: a replicated step gathers from it, its keys within half a step
    assert report["compact_dtype"] == "uint8" and np.all(np.isfinite(report["compact_losses"]))
    assert report["compact_key_error_over_half_step"] < 1e-6
    # the table on the host (train.py's): its rows come with each batch, the steps are the same
    assert report["host_dtype"] == "uint8"
    np.testing.assert_allclose(report["host_losses"], report["compact_losses"], rtol=1e-5)
    assert report["host_vs_compact_weights"] < 1e-5, report["host_vs_compact_weights"]
    # the refresh is shared: each of the 2 devices scores its share of every batch (the table is the
    # scorer's on all images, above); a probe sees shares of 4 rows of a 7-row batch, never all of it
    assert report["refresh_devices"] == 2
    assert 4 in report["shared_rows_seen"] and max(report["shared_rows_seen"]) == 4, report["shared_rows_seen"]
    assert report["shared_shape"] == [7, 2] and report["shared_error"] == 0.0


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute replicas (JAX draws once per global batch)")
def test_tensorflow_replicas_draw_different_masks(distributed_report):
    """The same images on both replicas of one step: each replica draws its own mask pattern, and
    the generator state advances once, as on one device (so checkpoints and resumes hold); the
    corruption layers of MFM and the restoration baselines too."""
    first, second = (np.asarray(m) for m in distributed_report["replica_masks"])
    assert first.shape == second.shape == (4, 12)  # 4 images per replica, 12 of 16 patches masked (MAE 0.75)
    for masks in (first, second):  # valid draws: distinct ascending indices
        assert np.all(np.diff(masks, axis=1) > 0) and masks.min() >= 0 and masks.max() < 16
    assert not np.array_equal(first, second)
    assert not any(np.array_equal(a, b) for a in first for b in second)  # no row repeats across replicas
    assert distributed_report["seed_state_after"] == [5, 1]
    # MFM's spectrum masks (low- or high-pass per image) and the denoising baseline's noise as well
    assert not distributed_report["replica_noise_equal"]
    first, second = distributed_report["replica_kept_masks"]
    assert len(set(first + second)) == 2 and first != second, (first, second)  # both kinds drawn, differently


def test_replica_seed_generator_is_a_plain_seed_generator_outside_replicas():
    """One device (and JAX, PyTorch): the same numbers and states as keras.random.SeedGenerator."""
    plain, replica = keras.random.SeedGenerator(11), distribution.ReplicaSeedGenerator(11)
    for _ in range(3):
        a = keras.ops.convert_to_numpy(keras.random.uniform((2, 5), seed=plain))
        b = keras.ops.convert_to_numpy(keras.random.uniform((2, 5), seed=replica))
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(plain.state), keras.ops.convert_to_numpy(replica.state))
    assert keras.ops.convert_to_numpy(replica.state).tolist() == [11, 3]
    seed = keras.ops.convert_to_tensor(np.array([7, 2]), dtype=str(keras.ops.convert_to_numpy(plain.state).dtype))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(distribution.fold_in_replica(seed)), [7, 2])


def test_token_masking_models_draw_with_the_replica_seed_generator():
    from keras_mfm import methods
    from tests.test_mae import tiny_encoder

    for name in ("mae", "famt", "simmim", "simmim_famt"):
        options = {"num_images": 4} if "famt" in name else {}
        model = methods.build_method(name, tiny_encoder(), seed=0, **options)
        assert isinstance(model.seed_generator, distribution.ReplicaSeedGenerator), name


@pytest.mark.slow_on("jax", "tensorflow")  # end to end: XLA / graph tracing make it 2-8x the PyTorch time
@parallel_backends
def test_train_cli_distributed_famt_run(tmp_path):
    root = write_folder(str(tmp_path / "set"), per_class=8)
    output = str(tmp_path / "famt")
    args = ["train.py", "--method", "famt", "--data", root, "--epochs", "2", "--output", output, "--depth", "1",
            "--batch-size", "8", "--image-size", "16", "--patch-size", "4", "--eval", "linear", "--quiet",
            "--refresh-warmup", "1", "--refresh-interval", "1", "--decoder-dim", "32", "--decoder-depth", "1",
            "--decoder-heads", "2", "--distribute", "--cpu-devices", "2"]
    result = run_python(args, BACKEND)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.load(open(os.path.join(output, "config.json")))
    assert info["distribution"]["num_replicas"] == 2 and len(info["distribution"]["devices"]) == 2
    assert [r["epoch"] for r in info["importance_refreshes"]] == [1]
    assert np.isfinite(info["final_loss"]) and "linear_top1" in info["evaluation"]
    assert os.path.isfile(os.path.join(output, "encoder.keras"))

    # resuming keeps the distribution settings of the run
    result = run_python(["train.py", "--resume", "--output", output, "--quiet"], BACKEND)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(os.path.join(output, "config.json")))["distribution"]["num_replicas"] == 2


@parallel_backends
def test_too_many_devices_and_uneven_batch_are_clear_errors(tmp_path):
    root = write_folder(str(tmp_path / "set"), per_class=4)
    common = ["train.py", "--data", root, "--depth", "1", "--image-size", "16", "--eval", "none", "--quiet",
              "--output", str(tmp_path / "run"), "--distribute", "--cpu-devices", "2"]
    result = run_python(common + ["--batch-size", "6", "--devices", "3"], BACKEND)
    assert result.returncode == 2 and "--devices 3 asked" in result.stderr, result.stderr[-2000:]
    result = run_python(common + ["--batch-size", "7"], BACKEND)
    assert result.returncode == 2 and "does not split evenly over 2 replicas" in result.stderr, result.stderr[-2000:]


@pytest.mark.skipif(BACKEND != "torch", reason="the PyTorch backend's refusal")
def test_torch_refuses_distribution_clearly():
    with pytest.raises(distribution.DistributionError, match="not supported on the torch backend"):
        distribution.setup(distribute=True)


def test_single_device_replication_and_flag_checks():
    replication = distribution.setup(distribute=False)
    assert replication.num_replicas == 1 and replication.is_chief and replication.strategy is None
    with replication.scope():
        pass
    with pytest.raises(distribution.DistributionError, match="need --distribute"):
        distribution.setup(distribute=False, devices=2)
    with pytest.raises(distribution.DistributionError, match="does not split evenly over 4 replicas"):
        distribution.Replication("mirrored", num_replicas=4).check_batch_size(6)
    distribution.Replication("mirrored", num_replicas=4).check_batch_size(8)


def test_loss_scaling_is_identity_outside_replicas():
    loss = keras.ops.convert_to_tensor(2.5)
    assert float(keras.ops.convert_to_numpy(distribution.scale_loss_for_replicas(loss))) == 2.5


def test_cpu_device_flags_replace_an_earlier_count():
    flags = distribution.cpu_device_flags(4, "--xla_force_host_platform_device_count=2 --xla_foo=1")
    assert flags == "--xla_foo=1 --xla_force_host_platform_device_count=4"


def test_multi_host_flags_need_each_other():
    if BACKEND == "torch":
        pytest.skip("PyTorch refuses --distribute first")
    message = ("need all three" if BACKEND == "jax" else "described by the TF_CONFIG")
    with pytest.raises(distribution.DistributionError, match=message):
        distribution.setup(distribute=True, coordinator_address="localhost:1234")


def test_pretrain_on_torch_with_distribute_is_a_clear_error(tmp_path):
    if BACKEND != "torch":
        pytest.skip("PyTorch only")
    root = write_folder(str(tmp_path / "set"), per_class=4)
    config = training.PretrainConfig(data=root, depth=1, image_size=16, batch_size=4, distribute=True,
                                     output=str(tmp_path / "run"), eval="none", verbose=0)
    with pytest.raises(distribution.DistributionError, match="--backend jax"):
        training.pretrain(config)
