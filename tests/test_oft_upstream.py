"""OpenVLA-OFT against upstream's own code, recorded once (tests/fixtures/oft/README.md: moojink/openvla-oft
213c5ff with the transformers fork bc339d9, fp32, tiny checkpoint).

Proves, on three robots with different prompt lengths run as ONE batch through our stack: the prompt ids
our OpenVLA tokenizer path gives equal upstream's processor's; the evaluation image pipeline (TF JPEG,
Lanczos-3 and centre crop in numpy, then the Prismatic processor) gives upstream's pixel values; the
proprio normalisation gives upstream's; and the actions equal upstream's batch-1 answers within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.oft_checkpoints import DATASET, pattern_image, write_tiny_oft_checkpoint
from vla_inference.config import Settings
from vla_inference.models.openvla.oft import (
    OFTInputs,
    collate_prompts,
    normalize_proprio,
    unnormalize_actions,
)
from vla_inference.models.openvla.oft_checkpoint import load_oft_model, read_oft_checkpoint
from vla_inference.models.openvla.policy import SPACE_TOKEN, OpenVLAPolicy, preprocess_image
from vla_inference.preprocessing.tf_resize import oft_eval_image

FIXTURE = Path(__file__).parent / "fixtures" / "oft" / "upstream_reference.npz"


@pytest.fixture(scope="module")
def recorded() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return dict(data)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_oft_checkpoint(tmp_path_factory.mktemp("oft") / "ckpt", seed=0, convert=True)


def test_actions_match_upstream_for_a_mixed_batch(recorded: dict[str, np.ndarray], checkpoint: Path) -> None:
    info = read_oft_checkpoint(checkpoint)
    model = load_oft_model(info, "cpu", torch.float32)
    sd = model.state_dict()
    fingerprint = [
        sd["llm.embed_tokens.weight"].double().sum().item(),
        sd["projector.fc1.weight"].double().sum().item(),
        sum(v.double().sum().item() for k, v in sd.items() if k.startswith("action_head.")),
        sum(v.double().sum().item() for k, v in sd.items() if k.startswith("proprio_projector.")),
    ]
    np.testing.assert_allclose(
        fingerprint, recorded["fingerprint"], rtol=1e-9, err_msg="checkpoint writer drifted"
    )

    policy = OpenVLAPolicy(Settings(model_type="openvla"))  # the merged part is a plain OpenVLA checkpoint
    policy.load(str(checkpoint), "cpu")
    prompts, pixels, proprio = [], [], []
    for i, task in enumerate(recorded["tasks"]):
        size, seed = int(recorded["sizes"][i]), int(recorded["seeds"][i])
        ids = policy.tokenize(str(task))
        upstream_ids = recorded[f"s{i}_input_ids"].tolist()
        assert ids.tolist() == [*upstream_ids, SPACE_TOKEN]  # upstream appends 29871 in predict_action
        prompts.append(ids)
        images = [oft_eval_image(pattern_image(size, size, s)) for s in (seed, seed + 3)]
        row = torch.stack([preprocess_image(image, info.base.image) for image in images])  # (2, 6, 28, 28)
        np.testing.assert_allclose(
            row.reshape(12, 28, 28).numpy(), recorded[f"s{i}_pixel_values"], rtol=0, atol=1e-6
        )
        pixels.append(row)
        normalized = normalize_proprio(recorded[f"s{i}_state"], info.proprio[DATASET])
        np.testing.assert_allclose(normalized, recorded[f"s{i}_proprio"], rtol=0, atol=1e-12)
        proprio.append(torch.from_numpy(normalized).float())
    assert len({len(p) for p in prompts}) == 3  # three prompt lengths in one batch

    bos, text, valid = collate_prompts(prompts, info.config.vla.pad_token_id)
    inputs = OFTInputs(torch.stack(pixels), torch.stack(proprio), bos, text, valid)
    with torch.no_grad():
        hidden = model.action_hidden(inputs)
        normalized_actions = model(inputs)
    for i in range(len(prompts)):
        np.testing.assert_allclose(hidden[i].numpy(), recorded[f"s{i}_hidden"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(
            normalized_actions[i].numpy(), recorded[f"s{i}_normalized"], rtol=0, atol=1e-5
        )
        actions = unnormalize_actions(normalized_actions[i].double().numpy(), info.actions[DATASET])
        np.testing.assert_allclose(actions, recorded[f"s{i}_actions"], rtol=0, atol=1e-5)
        assert np.abs(recorded[f"s{i}_actions"]).max() > 0.1  # not a degenerate all-zero answer
