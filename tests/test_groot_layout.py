"""Real-size GR00T N1.5 on the meta device: every parameter name and shape, checked against an
independently derived fixture of the published checkpoint's tensors.

How the fixture is derived (none of it from our model code):
  * backbone.eagle_model.language_model.model.*  = transformers' Qwen3Model built on meta with
    the Qwen3-1.7B text config of N1.5's Eagle (hidden 2048, 16 heads, 8 kv heads, head_dim 128,
    ffn 6144, vocab 151680), cut to select_layer = 12 layers as upstream's EagleBackbone does.
  * backbone.eagle_model.vision_model.vision_model.* = transformers' SiglipVisionModel on meta with
    the N1.5 vision config (1152 wide, 27 layers, 16 heads, ffn 4304, patch 14, 224 px), without
    the pooling head (unused: GR00T takes last_hidden_state; the loader skips it if present).
  * backbone.eagle_model.mlp1.0 = Linear(1152, 2048) (mlp_connector_layers 1, no pixel shuffle).
  * action_head.* = shapes written out below from upstream's definitions
    (flow_matching_action_head.py, cross_attention_dit.py, diffusers Attention / FeedForward /
    TimestepEmbedding) with the published action_head_cfg of GR00T-N1.5-3B's config.json.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.helpers.groot_head import published_head_shapes
from tests.helpers.reference import assert_same_layout, checkpoint_shapes
from vla_inference.models.base import ModelLoadError
from vla_inference.models.groot.checkpoint import config_from_json, groot_names
from vla_inference.models.groot.model import GR00TN15, SIZES

# The published nvidia/GR00T-N1.5-3B config.json (the fields that shape the network).
N15_CONFIG_JSON = {
    "model_type": "gr00t_n1_5",
    "action_horizon": 16,
    "action_dim": 32,
    "backbone_cfg": {"project_to_dim": None, "reproject_vision": False, "select_layer": 12},
    "action_head_cfg": {
        "action_dim": 32,
        "action_horizon": 16,
        "add_pos_embed": True,
        "backbone_embedding_dim": 2048,
        "diffusion_model_cfg": {
            "attention_head_dim": 48,
            "cross_attention_dim": 2048,
            "dropout": 0.2,
            "final_dropout": True,
            "interleave_self_attention": True,
            "norm_type": "ada_norm",
            "num_attention_heads": 32,
            "num_layers": 16,
            "output_dim": 1024,
            "positional_embeddings": None,
        },
        "hidden_size": 1024,
        "input_embedding_dim": 1536,
        "max_action_dim": 32,
        "max_state_dim": 64,
        "num_inference_timesteps": 4,
        "num_target_vision_tokens": 32,
        "num_timestep_buckets": 1000,
        "use_vlln": True,
        "vl_self_attention_cfg": {
            "attention_head_dim": 64,
            "dropout": 0.2,
            "final_dropout": True,
            "num_attention_heads": 32,
            "num_layers": 4,
            "positional_embeddings": None,
        },
    },
}


def _prefixed(
    module: torch.nn.Module, prefix: str, strip: str = "", skip: str = ""
) -> dict[str, tuple[int, ...]]:
    out = {}
    for name, p in module.named_parameters():
        name = name.removeprefix(strip)
        if skip and name.startswith(skip):
            continue
        out[prefix + name] = tuple(p.shape)
    return out


def _fixture() -> dict[str, tuple[int, ...]]:
    text = transformers.Qwen3Config(
        vocab_size=151680,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=12,  # select_layer: upstream pops the layers above it
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
    )
    with torch.device("meta"):
        lm = transformers.Qwen3Model(text)
        vit = transformers.SiglipVisionModel(vision)
    fixture = _prefixed(lm, "backbone.eagle_model.language_model.model.", strip="model.")
    fixture |= _prefixed(
        vit, "backbone.eagle_model.vision_model.vision_model.", strip="vision_model.", skip="head."
    )
    fixture["backbone.eagle_model.mlp1.0.weight"] = (2048, 1152)
    fixture["backbone.eagle_model.mlp1.0.bias"] = (2048,)
    fixture |= published_head_shapes(64, 32, 16, 32)
    return fixture


def test_published_config_gives_the_n15_size() -> None:
    assert config_from_json(N15_CONFIG_JSON) == SIZES["n1.5-3b"]


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        (None, "model_type", "gr00t_n1", "gr00t_n1_5"),
        ("diffusion_model_cfg", "positional_embeddings", "sinusoidal", "positional_embeddings"),
        ("diffusion_model_cfg", "num_attention_heads", 16, "DiT width"),
        ("backbone_cfg", "select_layer", 40, "select_layer"),
    ],
)
def test_unsupported_configs_are_refused(section: str | None, key: str, value: object, message: str) -> None:
    import copy

    raw = copy.deepcopy(N15_CONFIG_JSON)
    target: dict = raw  # type: ignore[type-arg]
    if section == "diffusion_model_cfg":
        target = raw["action_head_cfg"]["diffusion_model_cfg"]  # type: ignore[index]
    elif section is not None:
        target = raw[section]  # type: ignore[assignment]
    target[key] = value
    with pytest.raises(ModelLoadError, match=message):
        config_from_json(raw)


def test_the_loader_reads_exactly_the_checkpoint_layout() -> None:
    """Through the name map, the tensors the loader reads are the published ones, name and shape;
    the tensors upstream keeps but never uses are skipped, not read."""
    cfg = config_from_json(N15_CONFIG_JSON)
    with torch.device("meta"):
        model = GR00TN15(cfg)
    names = groot_names(cfg)
    ours = checkpoint_shapes(names, model)
    fixture = _fixture()
    for unused in (
        "backbone.eagle_model.vision_model.vision_model.head.probe",
        "backbone.eagle_model.language_model.lm_head.weight",
        "backbone.eagle_model.language_model.model.layers.12.mlp.up_proj.weight",
    ):
        assert names.unused(unused) and unused not in ours
    assert not names.unused("backbone.eagle_model.language_model.model.layers.11.mlp.up_proj.weight")
    assert_same_layout(ours, fixture)


def test_parameter_count() -> None:
    with torch.device("meta"):
        total = sum(p.numel() for p in GR00TN15(SIZES["n1.5-3b"]).parameters())
    fixture_total = sum(int(torch.tensor(s).prod()) if s else 1 for s in _fixture().values())
    assert total == fixture_total
    # 2.40B built: LM cut at layer 12 ~0.915B, SigLIP ~0.412B, mlp1 2.4M, action head ~1.07B
    # (DiT 0.55B, VL adapter 0.20B, the 32 category-specific encoders / decoders 0.32B).
    # The "3B" in the published name counts the full 28-layer Qwen3 (+0.80B).
    assert 2.35e9 < total < 2.45e9
