"""OpenVLA-OFT against upstream's own code, recorded once (tests/fixtures/oft/README.md: moojink/openvla-oft
213c5ff with the transformers fork bc339d9, fp32, tiny checkpoint), through the whole serving path.

Proves, on three robots with different prompt lengths served as ONE batch by OpenVLAOFTPolicy (prepare ->
forward -> finish, as the engine calls them): the prompt ids equal upstream's processor's (+ the 29871
upstream's predict_action appends); the evaluation image pipeline (TF JPEG, Lanczos-3 and centre crop in
numpy, then the Prismatic processor) gives upstream's pixel values; the proprio normalisation (the shared
normaliser, bounds convention) gives upstream's; the hidden states, the head's normalised actions and the
un-normalised actions equal upstream's batch-1 answers within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.oft_checkpoints import pattern_image, write_tiny_oft_checkpoint
from vla_inference.config import Settings
from vla_inference.models.base import Observation
from vla_inference.models.openvla.oft import OFTBatch
from vla_inference.models.openvla.policy import SPACE_TOKEN, OpenVLAOFTPolicy

FIXTURE = Path(__file__).parent / "fixtures" / "oft" / "upstream_reference.npz"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def recorded() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return dict(data)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> OpenVLAOFTPolicy:
    path = write_tiny_oft_checkpoint(tmp_path_factory.mktemp("oft") / "ckpt", seed=0, convert=True)
    served = OpenVLAOFTPolicy(Settings(model_type="openvla"))
    served.load(str(path), "cpu")
    return served


def _observations(recorded: dict[str, np.ndarray]) -> list[Observation]:
    """The recorded robots as a transport decodes them: full_image as `base`, wrist_image as `wrist`,
    the state as float32 joint_positions."""
    out = []
    for i, task in enumerate(recorded["tasks"]):
        size, seed = int(recorded["sizes"][i]), int(recorded["seeds"][i])
        images = {"base": pattern_image(size, size, seed), "wrist": pattern_image(size, size, seed + 3)}
        state = recorded[f"s{i}_state"].astype(np.float32)
        out.append(Observation(images=images, joint_positions=state, instruction=str(task)))
    return out


def test_the_policy_matches_upstream_for_a_mixed_batch(
    recorded: dict[str, np.ndarray], policy: OpenVLAOFTPolicy
) -> None:
    sd = policy.loaded.network.state_dict()
    fingerprint = [
        sd["llm.embed_tokens.weight"].double().sum().item(),
        sd["projector.fc1.weight"].double().sum().item(),
        sum(v.double().sum().item() for k, v in sd.items() if k.startswith("action_head.")),
        sum(v.double().sum().item() for k, v in sd.items() if k.startswith("proprio_projector.")),
    ]
    np.testing.assert_allclose(
        fingerprint, recorded["fingerprint"], rtol=1e-9, err_msg="checkpoint writer drifted"
    )

    samples = [policy.prepare(o) for o in _observations(recorded)]
    for i, sample in enumerate(samples):
        assert sample.inputs.input_ids.tolist() == [*recorded[f"s{i}_input_ids"].tolist(), SPACE_TOKEN]
        np.testing.assert_allclose(
            sample.inputs.pixels.reshape(12, 28, 28).numpy(),
            recorded[f"s{i}_pixel_values"],
            rtol=0,
            atol=1e-6,
        )
        # float32 joint positions (as on the wire) against upstream's float64 state: rounding only
        np.testing.assert_allclose(
            sample.inputs.proprio.numpy(), recorded[f"s{i}_proprio"], rtol=0, atol=1e-6
        )
    assert len({len(s.inputs.input_ids) for s in samples}) == 3  # three prompt lengths in one batch

    raws = policy.forward(samples)  # one batch
    network = policy.loaded.network
    pixels = torch.stack([s.inputs.pixels for s in samples])
    proprio = torch.stack([s.inputs.proprio for s in samples])
    with torch.inference_mode():
        hidden = network.action_hidden(
            OFTBatch(network.layout(pixels, [s.inputs.input_ids for s in samples]), proprio)
        )
    for i, (raw, sample) in enumerate(zip(raws, samples, strict=True)):
        np.testing.assert_allclose(hidden[i].numpy(), recorded[f"s{i}_hidden"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(raw.actions, recorded[f"s{i}_normalized"], rtol=0, atol=1e-5)
        prediction = policy.finish(raw, sample)
        assert prediction.actions.shape == (8, 7) and prediction.actions.dtype == np.float32
        np.testing.assert_allclose(prediction.actions, recorded[f"s{i}_actions"], rtol=0, atol=1e-5)
        assert np.abs(recorded[f"s{i}_actions"]).max() > 0.1  # not a degenerate all-zero answer
