"""The model pool with real onnxruntime sessions: sharing, memory budget, idle unload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.errors import MemoryBudgetExceeded
from agent.pool import MB, ModelPool, PooledModel, ServingModel
from tests.support.model_bytes import linear_model, write_model
from tests.support.models import dense_of_size


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


# -- the previous model held for rollback during an update ------------------------


def update(pool: ModelPool, tenant: str, path: Path, digest: str, version: str) -> ServingModel:
    """What the updater does: hold the serving model, load the new one beside it, swap."""
    pool.hold(tenant)
    model = pool.load(digest, path, "onnxruntime")
    serving = ServingModel(tenant, "m", version, digest, "onnxruntime", path, model)
    pool.put(serving, hold_previous=True)
    return serving


def test_an_update_whose_new_and_held_previous_models_exceed_the_budget_is_refused(tmp_path: Path) -> None:
    v1 = dense_of_size(tmp_path / "v1.onnx", 1.0, seed=1)
    v2 = dense_of_size(tmp_path / "v2.onnx", 1.0, seed=2)
    pool = ModelPool(budget_bytes=int(1.5 * MB), clock=FakeClock())
    first = serve(pool, "a", v1, "1" * 64)
    assert isinstance(first.model, PooledModel)
    held = pool.hold("a")
    # Idle, but held: it is the rollback copy, so it is not unloaded to make room.
    with pytest.raises(
        MemoryBudgetExceeded,
        match=r"needs 1\.0 MB but 1\.0 MB of the 1\.5 MB model memory budget are in use "
        r"\(1\.0 MB by m 1 of tenant a, kept loaded for rollback until its update ends\)",
    ):
        pool.load("2" * 64, v2, "onnxruntime")
    assert held is first and first.model.loaded and pool.loaded_bytes() == v1.stat().st_size
    # Without an update in progress an idle model may still give way, as before.
    pool.release("a")
    pool.load("2" * 64, v2, "onnxruntime")
    assert not first.model.loaded


def test_the_held_previous_model_counts_until_the_update_ends(tmp_path: Path) -> None:
    v1 = dense_of_size(tmp_path / "v1.onnx", 1.0, seed=1)
    v2 = dense_of_size(tmp_path / "v2.onnx", 1.0, seed=2)
    other = dense_of_size(tmp_path / "other.onnx", 1.0, seed=3)
    size = v1.stat().st_size
    clock = FakeClock()
    pool = ModelPool(budget_bytes=int(2.5 * MB), idle_unload_s=60, clock=clock)
    first = serve(pool, "a", v1, "1" * 64)
    second = update(pool, "a", v2, "2" * 64, "2")
    assert pool.held("a") is first and pool.get("a") is second
    assert pool.loaded_bytes() == 2 * size  # the old model still serves a rollback, so it counts
    assert isinstance(second.model, PooledModel)
    second.model.in_use = 1  # the new model is busy; the held one is idle but not a victim
    with pytest.raises(MemoryBudgetExceeded, match=r"2\.0 MB of the 2\.5 MB .* \(1\.0 MB by m 1 of tenant a"):
        pool.load("3" * 64, other, "onnxruntime")
    second.model.in_use = 0
    clock.now = 120
    assert pool.sweep() == ["2" * 64]  # idle: the serving model unloads, the held one stays
    assert first.model.loaded  # type: ignore[attr-defined]

    assert pool.release("a") is first  # committed
    assert pool.loaded_bytes() == 0 and pool.held("a") is None
    serve(pool, "b", other, "3" * 64)
    assert pool.loaded_bytes() == size


def test_holding_a_model_unloaded_while_idle_loads_it_again(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    digest = write_model(path, linear_model(1))
    clock = FakeClock()
    pool = ModelPool(idle_unload_s=60, clock=clock)
    first = serve(pool, "a", path, digest)
    clock.now = 120
    assert pool.sweep() == [digest] and not first.model.loaded  # type: ignore[attr-defined]
    pool.hold("a")
    assert first.model.loaded and pool.loaded_bytes() == path.stat().st_size  # type: ignore[attr-defined]
    pool.remove("a")
    assert pool.held("a") is None and pool.loaded_bytes() == 0
