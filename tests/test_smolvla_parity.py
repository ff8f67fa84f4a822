"""Parity with LeRobot's own SmolVLA (v0.4.4) on a checkpoint LeRobot saved itself.

tests/fixtures/smolvla/ (README.md there says how it was recorded): the checkpoint directory exactly
as LeRobot's save_pretrained wrote it, the tiny SmolVLM backbone directory it was built from, and
reference.npz with LeRobot's inputs and outputs for two observations (two cameras + a filler; one
camera + a filler, with a prompt long enough to be truncated): the processed images, the normalised
state, the prompt token ids, the noise, the normalised actions (fp32, 10 Euler steps) and the
un-normalised actions of its postprocessor. Checked for the network alone and for the whole
served path (SmolVLAPolicy: prepare, forward, finish).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vla_inference.config import Settings
from vla_inference.models.base import Observation
from vla_inference.models.smolvla import checkpoint as ckpt
from vla_inference.models.smolvla.model import SmolVLABatch, SmolVLAModel
from vla_inference.models.smolvla.policy import SmolVLAPolicy

FIXTURE = Path(__file__).parent / "fixtures" / "smolvla"
CASES = {"two_cameras": ("camera1", "camera2"), "one_camera": ("camera1",)}


@pytest.fixture(scope="module")
def loaded() -> tuple[ckpt.Checkpoint, SmolVLAModel]:
    c = ckpt.load(FIXTURE / "checkpoint", tokenizer_path=str(FIXTURE / "vlm"))
    return c, c.load_network("cpu", torch.float32)


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE / "reference.npz"))


def resize_with_pad(image: np.ndarray, size: int) -> torch.Tensor:
    """LeRobot's image preparation, from its description: uint8 / 255, bilinear resize keeping the
    aspect ratio (sizes truncated to int), zero padding on the left and top, then x * 2 - 1."""
    img = torch.from_numpy(image).float()[None] / 255.0
    h, w = img.shape[2:]
    ratio = max(w / size, h / size)
    rh, rw = int(h / ratio), int(w / ratio)
    img = F.interpolate(img, size=(rh, rw), mode="bilinear", align_corners=False)
    return F.pad(img, (size - rw, 0, size - rh, 0), value=0.0)[0] * 2.0 - 1.0


def inputs_for(label: str, ref: dict[str, np.ndarray], c: ckpt.Checkpoint) -> SmolVLABatch:
    size = c.config.vision.image_size
    images = [resize_with_pad(ref[f"{label}.image.{cam}"], size) for cam in CASES[label]]
    masks = ref[f"{label}.image_masks"][0]
    images += [-torch.ones(3, size, size)] * (len(masks) - len(images))  # LeRobot's filler images
    state = F.pad(torch.from_numpy(ref[f"{label}.normalized_state"]), (0, c.config.max_state_dim - 6))
    return SmolVLABatch(
        torch.stack(images)[None],
        torch.from_numpy(masks)[None],
        torch.from_numpy(ref[f"{label}.tokens"]),
        torch.from_numpy(ref[f"{label}.token_mask"]),
        state,
    )


def test_fixture_is_lerobots_format(loaded: tuple[ckpt.Checkpoint, SmolVLAModel]) -> None:
    c, _ = loaded
    assert c.features.cameras == ("observation.images.camera1", "observation.images.camera2")
    assert c.features.empty_cameras == 1 and c.missing_stats() == []
    assert c.normalizer is not None and "step_5_normalizer_processor" in c.normalizer.source
    assert (c.tokenizer.max_length, c.tokenizer.padding) == (12, "max_length")


@pytest.mark.parametrize("label", list(CASES))
def test_prompt_tokens_identical(
    loaded: tuple[ckpt.Checkpoint, SmolVLAModel], reference: dict[str, np.ndarray], label: str
) -> None:
    c, _ = loaded
    tok, pad_id = ckpt.load_tokenizer(c.tokenizer, c.config.vocab_size)
    ids, mask = ckpt.tokenize_prompt(
        tok, pad_id, str(reference[f"{label}.task"]), c.tokenizer.max_length, c.tokenizer.padding
    )
    assert ids.tolist() == reference[f"{label}.tokens"][0].tolist()
    assert mask.tolist() == reference[f"{label}.token_mask"][0].tolist()


def test_image_preparation_identical(
    loaded: tuple[ckpt.Checkpoint, SmolVLAModel], reference: dict[str, np.ndarray]
) -> None:
    c, _ = loaded
    prepared = reference["two_cameras.prepared_images"][0]  # (3 slots, 3, 64, 64), slot 2 the filler
    for slot, cam in enumerate(CASES["two_cameras"]):
        ours = resize_with_pad(reference[f"two_cameras.image.{cam}"], c.config.vision.image_size)
        assert np.array_equal(ours.numpy(), prepared[slot])
    assert (prepared[2] == -1).all()
    # 48 x 80 -> 38 x 64: 26 rows of padding on top (LeRobot pads left / top; openpi centres)
    assert (prepared[0][:, :26] == -1).all() and not (prepared[0][:, 26] == -1).all()


@pytest.mark.parametrize("label", list(CASES))
def test_normalised_actions_match(
    loaded: tuple[ckpt.Checkpoint, SmolVLAModel], reference: dict[str, np.ndarray], label: str
) -> None:
    c, model = loaded
    with torch.no_grad():
        actions, _ = model.sample(
            inputs_for(label, reference, c), torch.from_numpy(reference[f"{label}.noise"]), 10
        )
    expected = reference[f"{label}.normalized_actions"]
    assert np.abs(expected).max() > 1.0
    assert np.abs(actions.numpy() - expected).max() < 1e-5


# ---- the whole policy path: Observation -> prepare -> forward -> finish --------------------------


@pytest.fixture(scope="module")
def policy() -> SmolVLAPolicy:
    torch.set_num_threads(1)
    served = SmolVLAPolicy(Settings(chunk_size=50, tokenizer_path=str(FIXTURE / "vlm")))
    served.load(str(FIXTURE / "checkpoint"), "cpu")
    return served


def observation(label: str, ref: dict[str, np.ndarray]) -> Observation:
    """The fixture's raw observation as a robot sends it: HWC uint8 images under the checkpoint's
    camera names, the raw state, the task; seed 11 draws the fixture's noise."""
    images = {cam: ref[f"{label}.image.{cam}"].transpose(1, 2, 0) for cam in CASES[label]}
    return Observation(images, ref[f"{label}.state"], str(ref[f"{label}.task"]), seed=11)


@pytest.mark.parametrize("label", list(CASES))
def test_policy_prepares_lerobots_inputs(
    policy: SmolVLAPolicy, reference: dict[str, np.ndarray], label: str
) -> None:
    """prepare: the prompt ids, the normalised state and the processed images are LeRobot's,
    bit for bit; the sample's noise (seed 11) is the fixture's."""
    sample = policy.prepare(observation(label, reference))
    inputs = sample.inputs
    assert inputs.tokens.tolist() == reference[f"{label}.tokens"][0].tolist()
    assert inputs.token_mask.tolist() == reference[f"{label}.token_mask"][0].tolist()
    assert inputs.state[:6].tolist() == reference[f"{label}.normalized_state"][0].tolist()
    assert not inputs.state[6:].any() and inputs.state.shape == (32,)
    assert torch.equal(policy.noise(sample.seed), torch.from_numpy(reference[f"{label}.noise"][0]))
    masks = reference[f"{label}.image_masks"][0]  # LeRobot's: present cameras, then the filler
    assert inputs.image_masks.tolist() == masks[: len(inputs.image_masks)].tolist()
    if label == "two_cameras":
        assert np.array_equal(inputs.images, reference["two_cameras.prepared_images"][0][:2])


@pytest.mark.parametrize("label", list(CASES))
def test_policy_actions_match_lerobot(
    policy: SmolVLAPolicy, reference: dict[str, np.ndarray], label: str
) -> None:
    """Observation -> actions through the served path (prepare, collate, the shared Euler sampler,
    the unnormaliser): LeRobot's normalised actions within 1e-5, its robot actions too."""
    sample = policy.prepare(observation(label, reference))
    (raw,) = policy.forward([sample])
    prediction = policy.finish(raw, sample)
    expected = reference[f"{label}.normalized_actions"][0]
    assert np.abs(expected).max() > 1.0
    assert np.abs(raw.actions - expected).max() < 1e-5
    assert prediction.actions.shape == (6, 5)
    assert np.abs(prediction.actions - reference[f"{label}.actions"][0]).max() < 1e-5
