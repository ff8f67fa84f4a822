"""GR00T N1.7 against NVIDIA's own inference path (Isaac-GR00T 626af89, transformers 4.57.3, fp32),
recorded on the tiny checkpoint tests/helpers/groot17_checkpoints.py writes with seed 7 (see
tests/fixtures/groot17/README.md for the procedure).

Per case (libero_sim, absolute actions; a relative-joint tag with two video frames): the
processor's prompt, tokens, processed images and normalised state; the noise; the normalised actions
of Gr00tN1d7.get_action; the actions after decode_action. The bar (issue 25): tokens identical,
normalised actions within 1e-5, actions within 1e-4.

The whole policy path (Groot17Policy: prepare -> forward -> finish, the raw frames, state and
instruction in, the observation's seed drawing upstream's noise) meets it; so do the network alone
on the recorded processed inputs, and the decode written out from upstream's formulas.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from tests.helpers.groot17_checkpoints import write_tiny_groot17_checkpoint
from vla_inference.models.base import ModelSettings, Observation
from vla_inference.models.groot import n17_checkpoint as ckpt
from vla_inference.models.groot.cosmos import mrope_positions
from vla_inference.models.groot.n17 import Groot17, Groot17Batch
from vla_inference.models.groot.n17_policy import Groot17Policy
from vla_inference.models.groot.policy import video_roles

FIXTURE = Path(__file__).parent / "fixtures" / "groot17" / "isaac_gr00t_626af89.json"
SEED = 7


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_groot17_checkpoint(tmp_path_factory.mktemp("n17") / "ckpt", seed=SEED)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> Groot17:
    torch.set_num_threads(1)
    return ckpt.load_model(checkpoint, ckpt.read_config(checkpoint), torch.float32, "cpu")


def _cases(recorded: dict[str, Any]) -> list[dict[str, Any]]:
    assert recorded["transformers"] == "4.57.3"
    assert [c["tag"] for c in recorded["cases"]] == ["libero_sim", "oxe_droid_relative_eef_relative_joint"]
    return list(recorded["cases"])


@pytest.fixture(scope="module")
def policy(checkpoint: Path) -> Groot17Policy:
    torch.set_num_threads(1)
    loaded = Groot17Policy(ModelSettings(model_type="groot", model_path=str(checkpoint), chunk_size=64))
    loaded.load(str(checkpoint), "cpu")
    return loaded


def _observation(policy: Groot17Policy, case: dict[str, Any]) -> Observation:
    """The case's raw inputs as the server receives them: the current frames, the earlier ones as
    history (its video delta_indices), the joint positions (its state keys concatenated)."""
    emb = policy.loaded.embodiments[case["tag"]]
    roles = [role for role, _ in video_roles(emb.cameras)]
    frames = {key: [np.asarray(f, dtype=np.uint8) for f in v] for key, v in case["raw_images"].items()}
    at = {offset: i for i, offset in enumerate(emb.video_offsets)}

    def step(offset: int) -> dict[str, np.ndarray]:
        return {role: frames[key][at[offset]] for role, key in zip(roles, emb.cameras, strict=True)}

    joints = np.concatenate([np.asarray(case["raw_state"][k.key], np.float32)[-1] for k in emb.state])
    return Observation(
        images=step(0),
        joint_positions=joints,
        instruction=case["text"],
        embodiment=case["tag"],
        seed=case["seed"],
        past_images={offset: step(offset) for offset in emb.image_history},
    )


def test_the_policy_matches_isaac_gr00t(recorded: dict[str, Any], policy: Groot17Policy) -> None:
    for case in _cases(recorded):
        emb = policy.loaded.embodiments[case["tag"]]
        observation = _observation(policy, case)
        sample = policy.prepare(observation)
        assert sample.inputs.input_ids.tolist() == case["input_ids"][0]  # tokens identical
        assert sample.inputs.projector == case["embodiment_id"]
        images = [policy.loaded.images.frame(f) for f in policy._frames(observation, emb)]
        np.testing.assert_array_equal(np.stack(images), np.asarray(case["images"], np.uint8))
        np.testing.assert_allclose(
            sample.inputs.state.numpy(), np.asarray(case["state"])[0], rtol=0, atol=1e-6
        )
        raw = policy.forward([sample])[0]
        normalised = np.asarray(case["normalized_actions"])[0]
        np.testing.assert_allclose(raw.actions, normalised, rtol=0, atol=1e-5)
        prediction = policy.finish(raw, sample)
        expected = np.concatenate([np.asarray(case["actions"][k.key])[0] for k in emb.action], axis=-1)
        assert prediction.actions.shape == (emb.horizon, emb.action_dim)
        np.testing.assert_allclose(prediction.actions, expected, rtol=0, atol=1e-4)


def test_normalised_actions_match_isaac_gr00t(recorded: dict[str, Any], model: Groot17) -> None:
    cfg = model.cfg
    side = cfg.image_size // (cfg.backbone.vision.patch_size * cfg.backbone.vision.merge)
    for case in _cases(recorded):
        images = torch.tensor(np.asarray(case["images"], dtype=np.uint8)).permute(0, 3, 1, 2).float()
        pixels = (images / 255.0 - 0.5) / 0.5  # the Qwen2-VL image processor: rescale, mean = std = 0.5
        ids = torch.tensor(case["input_ids"])
        mask = torch.tensor(case["attention_mask"]).bool()
        positions = mrope_positions(ids, mask, (side, side), cfg.backbone.image_token_id)
        state = torch.tensor(case["state"]).reshape(1, cfg.head.state_history, -1)
        noise = torch.tensor(case["noise"])
        torch.manual_seed(case["seed"])
        assert torch.equal(noise, torch.randn(noise.shape))  # the draw upstream's get_action makes
        ids_emb = torch.tensor([case["embodiment_id"]])
        batch = Groot17Batch(pixels[None], ids, mask, positions.transpose(0, 1), state, ids_emb)
        with torch.no_grad():
            actions, _ = model.sample(batch, noise, cfg.head.num_inference_timesteps)
        expected = torch.tensor(case["normalized_actions"])
        torch.testing.assert_close(actions, expected, rtol=0, atol=1e-5)


def test_tokens_match_isaac_gr00t(recorded: dict[str, Any], checkpoint: Path, model: Groot17) -> None:
    """The prompt as upstream renders it: the instruction lower-cased without punctuation
    (formalize_language), one user turn (the images, then the text) through the backbone's own
    chat template (Jinja), each image's <|image_pad|> expanded to its merged-token count."""
    files = ckpt.find_backbone_files(checkpoint, "")
    template = jinja2.Environment().from_string(files.chat_template)
    tokenizer = Tokenizer.from_file(str(files.tokenizer))
    for case in _cases(recorded):
        text = re.sub(r"[^\w\s]", "", case["text"].lower())
        content = [{"type": "image"} for _ in case["images"]] + [{"type": "text", "text": text}]
        prompt = template.render(messages=[{"role": "user", "content": content}], add_generation_prompt=False)
        assert prompt == case["prompt"]
        expanded = prompt.replace("<|image_pad|>", "<|image_pad|>" * model.cfg.tokens_per_image)
        assert tokenizer.encode(expanded, add_special_tokens=False).ids == case["input_ids"][0]


def _unnormalise(a: np.ndarray, low: list[float], high: list[float]) -> np.ndarray:
    return (np.clip(a, -1.0, 1.0) + 1.0) / 2.0 * (np.asarray(high) - np.asarray(low)) + np.asarray(low)


def test_actions_match_isaac_gr00t(recorded: dict[str, Any], checkpoint: Path) -> None:
    """decode_action written out: split the normalised chunk by the action keys (dims from the
    statistics), q01 / q99 (use_percentiles) for absolute keys; a RELATIVE key is unnormalised with
    relative_action's min / max and added to the input state's last step."""
    files = ckpt.read_processor_files(checkpoint)
    for case in _cases(recorded):
        tag = case["tag"]
        action = files.modalities[tag]["action"]
        stats = files.statistics[tag]
        relative = {
            c["state_key"] for c in action.extra.get("action_configs") or [] if c["rep"] == "RELATIVE"
        }
        chunk = np.asarray(case["normalized_actions"])[:, : len(action.delta_indices)]
        start = 0
        for key in action.modality_keys:
            dim = len(stats["action"][key]["q01"])
            part = chunk[..., start : start + dim]
            start += dim
            if key in relative:
                rel = stats["relative_action"][key]
                state = np.asarray(case["raw_state"][key])[-1]
                decoded = _unnormalise(part, rel["min"], rel["max"]) + state
            else:
                decoded = _unnormalise(part, stats["action"][key]["q01"], stats["action"][key]["q99"])
            np.testing.assert_allclose(decoded, np.asarray(case["actions"][key]), rtol=0, atol=1e-4)
