"""benchmarks/famt_vs_mae.py: the authors' refresh schedule it runs and the total-time projection."""

import importlib.util
import os

import pytest

from keras_mfm.importance import ImportanceRefresh
from tests.conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("famt_vs_mae", os.path.join(REPO, "benchmarks", "famt_vs_mae.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("epochs, first, count", [(4, 1, 3), (10, 1, 9), (100, 10, 9), (400, 40, 9), (800, 80, 9)])
def test_the_schedule_is_the_authors_and_the_count_is_the_callbacks(bench, epochs, first, count):
    # the authors: first refresh at epoch 40 of 400, then every 40 -> 40, 80, ..., 360
    warmup, interval = bench.authors_schedule(epochs)
    assert warmup == first and bench.refresh_count(epochs) == count
    callback = ImportanceRefresh(list, warmup, interval)
    assert sum(callback.due(epoch) for epoch in range(epochs)) == count


def test_projected_ratio_by_hand(bench):
    # 10 epochs: 10 * 6 s of FAMT training + 9 refreshes of 5 s, against 10 * 10 s of MAE
    assert bench.projected_ratio(10, mae_epoch=10.0, famt_epoch=6.0, refresh=5.0) == pytest.approx(105 / 100)
    # 400 epochs: the same 9 refreshes over 40 times as many epochs
    assert bench.projected_ratio(400, 10.0, 6.0, 5.0) == pytest.approx((400 * 6 + 9 * 5) / 4000)
