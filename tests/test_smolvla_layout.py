"""The published SmolVLA layout (lerobot/smolvla_base and its fine-tunes), on the meta device.

The expected tensor names and shapes are derived independently of our model code, the way LeRobot
builds and saves the policy (policies/smolvla/smolvlm_with_expert.py, modeling_smolvla.py):

1. transformers' SmolVLMForConditionalGeneration with SmolVLM2-500M-Video-Instruct's sizes (written
   out below: SigLIP 768 wide, 12 layers, 12 heads, MLP 3072, 512 px, patch 16; Llama text 960 wide,
   32 layers, 15 / 5 heads of 64, MLP 2560, vocabulary 49280; pixel shuffle 4; untied LM head),
   with only the first num_vlm_layers = 16 text layers kept, names under "model.vlm_with_expert.vlm.";
2. the action expert: transformers' LlamaModel from a copy of the text config at 0.75 x 960 = 720
   wide, MLP 256 * ceil(4 * int(2 * 720 / 3) / 256) = 2048, 16 layers, without its token embedding;
   on the cross layers (odd indices, self_attn_every_n_layers = 2) k_proj / v_proj are
   Linear(5 * 64 -> 5 * 64) without bias; names under "model.vlm_with_expert.lm_expert.";
3. the heads under "model.": state_proj Linear(32 -> 960), action_in_proj Linear(32 -> 720),
   action_out_proj Linear(720 -> 32), action_time_mlp_in Linear(1440 -> 720), action_time_mlp_out
   Linear(720 -> 720), all with bias.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from tests.helpers.reference import checkpoint_shapes
from vla_inference.models.smolvla import checkpoint as ckpt
from vla_inference.models.smolvla.model import SmolVLAConfig, build

SMOLVLM2_500M = {
    "scale_factor": 4,
    "tie_word_embeddings": False,
    "vocab_size": 49280,
    "text_config": {
        "model_type": "llama",
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "head_dim": 64,
        "vocab_size": 49280,
        "rms_norm_eps": 1e-5,
    },
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 512,
        "patch_size": 16,
    },
}
KEPT = 16


@pytest.fixture(scope="module")
def published() -> dict[str, tuple[int, ...]]:
    config = transformers.SmolVLMConfig(**SMOLVLM2_500M)
    with torch.device("meta"):
        vlm = transformers.SmolVLMForConditionalGeneration(config)
        vlm.model.text_model.layers = vlm.model.text_model.layers[:KEPT]
        expert_cfg = transformers.LlamaConfig(
            hidden_size=720,
            intermediate_size=2048,
            num_hidden_layers=KEPT,
            num_attention_heads=15,
            num_key_value_heads=5,
            head_dim=64,
            vocab_size=49280,
        )
        expert = transformers.LlamaModel(expert_cfg)
        for i in range(1, KEPT, 2):
            expert.layers[i].self_attn.k_proj = nn.Linear(320, 320, bias=False)
            expert.layers[i].self_attn.v_proj = nn.Linear(320, 320, bias=False)
        expert.embed_tokens = None
    layout = {ckpt.VLM + k: tuple(v.shape) for k, v in vlm.state_dict().items()}
    layout |= {ckpt.EXPERT + k: tuple(v.shape) for k, v in expert.state_dict().items()}
    for name, (n_in, n_out) in {
        "state_proj": (32, 960),
        "action_in_proj": (32, 720),
        "action_out_proj": (720, 32),
        "action_time_mlp_in": (1440, 720),
        "action_time_mlp_out": (720, 720),
    }.items():
        layout[f"model.{name}.weight"] = (n_out, n_in)
        layout[f"model.{name}.bias"] = (n_out,)
    return layout


def test_published_layout_has_500_tensors(published: dict[str, tuple[int, ...]]) -> None:
    assert len(published) == 500
    assert published[ckpt.LM_HEAD] == (49280, 960)
    assert published[ckpt.EXPERT + "layers.1.self_attn.k_proj.weight"] == (320, 320)
    assert published[ckpt.EXPERT + "layers.0.self_attn.k_proj.weight"] == (320, 720)


def test_real_size_matches_the_published_layout(published: dict[str, tuple[int, ...]]) -> None:
    model = build(SmolVLAConfig.named("smolvla_base"), device="meta")
    names = ckpt.lerobot_names()
    ours = checkpoint_shapes(names, model)  # what the loader reads, in the file's names
    expected = dict(published)
    skipped = {k: expected.pop(k) for k in list(expected) if names.unused(k)}
    assert skipped == {ckpt.LM_HEAD: (49280, 960)}  # the VLM's LM head: saved, never used
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: (ours[k], expected[k]) for k in ours if ours[k] != expected[k]} == {}
    assert len(ours) == 499


def test_parameter_counts() -> None:
    model = build(SmolVLAConfig.named("smolvla_base"), device="meta")

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert 86e6 < count(model.vision) < 87e6  # SigLIP base/16 at 512 px (1024 positions)
    assert count(model.connector) == 12288 * 960
    assert 200e6 < count(model.vlm) < 210e6  # 16 layers of 9.8M + the 49280 x 960 embedding (47M)
    assert 98e6 < count(model.expert) < 99e6
    # "SmolVLA (0.45B)": 403M that run, plus the 47M LM head the checkpoint carries unused
    assert 445e6 < count(model) + 49280 * 960 < 455e6
