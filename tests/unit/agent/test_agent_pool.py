"""The model pool with real onnxruntime sessions: sharing, memory budget, idle unload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.errors import MemoryBudgetExceeded
from agent.pool import MB, ModelPool, PooledModel, ServingModel
from tests.models import dense_of_size
from tests.unit.agent.models import linear_model, write_model


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def serve(pool: ModelPool, tenant: str, path: Path, digest: str) -> ServingModel:
    model = pool.load(digest, path, "onnxruntime")
    serving = ServingModel(tenant, "m", "1", digest, "onnxruntime", path, model)
    pool.put(serving)
    return serving


def test_tenants_on_one_artifact_share_one_loaded_copy(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    digest = write_model(path, linear_model(1))
    pool = ModelPool(threads=1)
    a, b = serve(pool, "a", path, digest), serve(pool, "b", path, digest)
    assert a.model is b.model and pool.loaded_bytes() == path.stat().st_size
    pool.remove("a")
    assert pool.load(digest, path, "onnxruntime") is b.model  # still used by b
    pool.remove("b")
    assert pool.loaded_bytes() == 0


def test_a_model_over_the_budget_is_refused_with_figures(tmp_path: Path) -> None:
    big = dense_of_size(tmp_path / "big.onnx", 2.0)
    pool = ModelPool(budget_bytes=1 * MB)
    with pytest.raises(
        MemoryBudgetExceeded, match=r"needs 2\.\d MB, more than the device's model memory budget of 1\.0 MB"
    ):
        pool.load("b" * 64, big, "onnxruntime")
    assert pool.loaded_bytes() == 0


def test_budget_unloads_an_idle_model_for_room_but_not_a_busy_one(tmp_path: Path) -> None:
    one = dense_of_size(tmp_path / "one.onnx", 1.0, seed=1)
    two = dense_of_size(tmp_path / "two.onnx", 1.0, seed=2)
    clock = FakeClock()
    pool = ModelPool(budget_bytes=int(1.5 * MB), clock=clock)
    first = serve(pool, "a", one, "1" * 64)
    assert isinstance(first.model, PooledModel)
    first.model.in_use = 1  # a run in progress holds it
    with pytest.raises(MemoryBudgetExceeded, match="are in use"):
        pool.load("2" * 64, two, "onnxruntime")
    first.model.in_use = 0
    second = serve(pool, "b", two, "2" * 64)
    assert not first.model.loaded and second.model.loaded  # type: ignore[attr-defined]


def test_idle_models_unload_and_reload_on_demand(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    digest = write_model(path, linear_model(2, 4, 3))
    clock = FakeClock()
    pool = ModelPool(idle_unload_s=60, clock=clock)
    serving = serve(pool, "a", path, digest)
    model = serving.model
    assert isinstance(model, PooledModel)
    x = np.ones((1, 4), np.float32)
    before = model.run({"x": x})["y"]
    clock.now = 59
    assert pool.sweep() == []
    clock.now = 120
    assert pool.sweep() == [digest] and not model.loaded and pool.loaded_bytes() == 0
    np.testing.assert_array_equal(model.run({"x": x})["y"], before)
    assert model.loaded and model.loads == 2
