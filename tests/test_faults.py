"""Fault injection the engine tests do not cover: a sample that runs out of memory even alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tests.support.toy_model import SimulatedOutOfMemory, ToyPolicy
from vla_inference.client import VLAError


class AlwaysOom(ToyPolicy):
    """Like ToyPolicy, but "oom-always" runs out of memory at any batch size, alone too."""

    oom_batches: list[int]

    def forward(self, samples):
        if any(s.inputs[1] == "oom-always" for s in samples):
            self.oom_batches.append(len(samples))
            raise SimulatedOutOfMemory()
        return super().forward(samples)


def test_single_sample_out_of_memory_is_resource_exhausted_for_it_alone(server_factory):
    holder: dict[str, AlwaysOom] = {}

    def factory(settings):
        holder["m"] = AlwaysOom(settings, batch_cost_s=0.05)
        holder["m"].oom_batches = []
        return holder["m"]

    running = server_factory(factory, batch_size=8, batch_timeout_ms=100)
    model = holder["m"]

    def call(i: int):
        with running.client() as client:
            image = np.full((16, 16, 3), i * 20, np.uint8)
            try:
                chunk = client.predict(image, [float(i)] * 7, "oom-always" if i == 2 else f"ok {i}", seed=i)
                return "OK", chunk
            except VLAError as exc:
                return exc.code.name, exc.message

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(call, range(6)))
    codes = [code for code, _ in outcomes]
    assert codes[2] == "RESOURCE_EXHAUSTED", outcomes[2]
    assert "out of device memory" in outcomes[2][1] and "Traceback" not in outcomes[2][1]
    assert codes.count("OK") == 5
    # batches holding the OOM sample: halved down to it alone (1) before it was given up
    assert model.oom_batches and model.oom_batches[-1] == 1
    with running.client() as client:
        assert client.health().ready
        assert len(client.predict(np.zeros((16, 16, 3), np.uint8), [0.0] * 7, "after").actions) == 8
