"""The floor: the model's own batched forward pass in-process, no server.

The observation is decoded and prepared once (as the server would: the same codec and
prepare()); each timed repetition is forward() + finish() of a batch of copies of it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from typing import Any

from bench.common import Target, summary_ms
from bench.loadgen import load_average


class Floor:
    """The target's model loaded in this process, measured on demand (measure() may be repeated:
    the cores are shared, contention only ever slows a measurement down, so the lower p50 of
    several measurements is the better estimate of the floor)."""

    def __init__(self, target: Target) -> None:
        from vla_inference.config import Settings
        from vla_inference.models.registry import create_model
        from vla_inference.transport import codec

        settings = Settings(model_type=target.model_type, model_path=target.checkpoint, device="cpu")
        t0 = time.perf_counter()
        self.model = create_model(settings)
        self.model.load(target.checkpoint or None, "cpu")
        self.load_s = time.perf_counter() - t0
        info = self.model.model_info
        request = target.request(info)
        prep: list[float] = []
        sample = None
        for _ in range(20):
            t = time.perf_counter()
            observation = codec.observation_from_proto(request, settings, info)
            sample = self.model.prepare(observation)
            prep.append(time.perf_counter() - t)
        assert sample is not None
        self.sample = sample
        self.result: dict[str, Any] = {
            "load_s": round(self.load_s, 2),
            "model_name": info.name,
            "family": info.family,
            "dtype": info.dtype,
            "decode_prepare": summary_ms(prep),
            "batches": {},
            "measurements": [],
        }

    def measure(self, batch_sizes: Sequence[int], reps: int, budget_s: float) -> dict[str, Any]:
        """Time forward + finish at each batch size; keep, per size, the run with the lower p50."""
        per_batch_budget = budget_s / max(1, len(batch_sizes))
        run: dict[str, Any] = {"loadavg_1m_at_start": load_average(), "batches": {}}
        for size in batch_sizes:
            batch = [self.sample] * size
            self.model.predict_batch(batch)  # warm-up
            times: list[float] = []
            end = time.perf_counter() + per_batch_budget
            while len(times) < reps and (len(times) < 3 or time.perf_counter() < end):
                t = time.perf_counter()
                self.model.predict_batch(batch)
                times.append(time.perf_counter() - t)
            stats = summary_ms(times)
            stats["per_sample_ms"] = round(stats["p50_ms"] / size, 3)
            stats["samples_per_s"] = round(size * 1000 / stats["p50_ms"], 3)
            run["batches"][str(size)] = stats
            best = self.result["batches"].get(str(size))
            if best is None or stats["p50_ms"] < best["p50_ms"]:
                self.result["batches"][str(size)] = stats
        self.result["measurements"].append(run)
        return self.result

    def close(self) -> None:
        del self.model, self.sample
        gc.collect()
