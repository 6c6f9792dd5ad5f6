from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from agent.telemetry import (
    MAX_SAMPLES,
    Inference,
    InferenceStats,
    Origin,
    PipelineStats,
    SystemSampler,
    temperature_c,
)


def test_window_statistics_per_model_version_then_reset() -> None:
    stats = InferenceStats()
    for ms in range(1, 101):
        stats.record(Inference("default", "m", "1", Origin.GRPC, float(ms), ok=True))
    stats.record(Inference("default", "m", "1", Origin.PIPELINE, 0.0, ok=False))
    stats.record(Inference("audio", "kws", "3", Origin.PIPELINE, 5.0, ok=True))
    audio, default = stats.drain()
    assert (audio.tenant, audio.inference_count, audio.latency_p99_ms) == ("audio", 1, 5.0)
    assert (audio.pipeline_inferences, audio.grpc_inferences) == (1, 0)
    assert (default.inference_count, default.error_count) == (101, 1)
    assert (default.grpc_inferences, default.grpc_errors) == (100, 0)
    assert (default.pipeline_inferences, default.pipeline_errors) == (1, 1)
    expected = np.percentile(np.arange(1, 101, dtype=float), [50, 95, 99])
    assert [default.latency_p50_ms, default.latency_p95_ms, default.latency_p99_ms] == list(expected)
    assert stats.drain() == []


def test_samples_are_bounded() -> None:
    stats = InferenceStats(random.Random(1))
    for _ in range(MAX_SAMPLES + 10):
        stats.record(Inference("t", "m", "1", Origin.SHADOW, 1.0, ok=True))
    assert stats.drain()[0].inference_count == MAX_SAMPLES + 10


def test_system_sample_has_memory_disk_and_optional_temperature(tmp_path: Path) -> None:
    s = SystemSampler(tmp_path).sample()
    assert s.mem_total_bytes > 0 and 0 <= s.mem_percent <= 100
    assert s.disk_total_bytes >= s.disk_used_bytes > 0
    assert s.HasField("temperature_c") == (temperature_c() is not None)


def test_samples_without_a_model_are_skipped_not_errors_nor_drops() -> None:
    stats = PipelineStats(clock=lambda: 1.0)
    stats.sample("yard")
    stats.skipped_no_model("yard")
    stats.skipped_no_model("yard")
    stats.dropped("yard", 1)
    [yard], _ = stats.drain({"yard": 1.0}, {})
    counts = (yard.samples, yard.skipped_no_model, yard.errors, yard.dropped, yard.inferences)
    assert counts == (1, 2, 0, 1, 0)
    [again], _ = stats.drain({"yard": 1.0}, {})
    assert again.skipped_no_model == 0
