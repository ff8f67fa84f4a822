"""Real-size GR00T N1.7 on the meta device against the published checkpoint layout, and tiny N1.7
checkpoints through the real loader.

How the fixture is derived (none of it from our model code):
  * backbone.model.model.{visual,language_model}.* = transformers' Qwen3VLForConditionalGeneration
    built on meta with the published nvidia/Cosmos-Reason2-2B config (docs: shared/reference
    models.md; LeRobot 0.6.1 hard-codes the same copy), its language model cut to select_layer = 16
    layers as Isaac-GR00T's Qwen3Backbone pops them; lm_head (tied) is in the files, never read.
  * action_head.* = shapes written out below from Isaac-GR00T's Gr00tN1d7ActionHead, AlternateVLDiT,
    SelfAttentionTransformer and the embodiment-conditioned MLPs (gr00t/model/gr00t_n1d7/gr00t_n1d7.py,
    gr00t/model/modules/dit.py, embodiment_conditioned_mlp.py at 626af89) with the published
    config.json values (DiT 32 x 32 x 48, VL self-attention 4 x 32 x 64, dims 132, horizon 40).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers

from tests.helpers.groot17_checkpoints import TINY, write_tiny_groot17_checkpoint
from tests.helpers.groot_head import published_head_shapes
from tests.helpers.reference import assert_same_layout, checkpoint_shapes
from vla_inference.models.base import ModelLoadError
from vla_inference.models.groot import n17_checkpoint as ckpt
from vla_inference.models.groot.action_head import TransformerBlock
from vla_inference.models.groot.n17 import SIZES, Groot17

# The published nvidia/GR00T-N1.7-3B config.json: the fields that shape the network.
N17_CONFIG_JSON = {
    "model_type": "Gr00tN1d7",
    "model_name": "nvidia/Cosmos-Reason2-2B",
    "backbone_model_type": "qwen",
    "select_layer": 16,
    "backbone_embedding_dim": 2048,
    "image_crop_size": [230, 230],
    "image_target_size": [256, 256],
    "max_state_dim": 132,
    "max_action_dim": 132,
    "action_horizon": 40,
    "hidden_size": 1024,
    "input_embedding_dim": 1536,
    "state_history_length": 1,
    "add_pos_embed": True,
    "use_vlln": True,
    "max_seq_len": 1024,
    "use_alternate_vl_dit": True,
    "attend_text_every_n_blocks": 2,
    "diffusion_model_cfg": {
        "positional_embeddings": None,
        "num_layers": 32,
        "num_attention_heads": 32,
        "attention_head_dim": 48,
        "norm_type": "ada_norm",
        "dropout": 0.2,
        "final_dropout": True,
        "output_dim": 1024,
        "interleave_self_attention": True,
    },
    "vl_self_attention_cfg": {
        "positional_embeddings": None,
        "num_layers": 4,
        "num_attention_heads": 32,
        "attention_head_dim": 64,
        "dropout": 0.2,
        "final_dropout": True,
    },
    "num_inference_timesteps": 4,
    "noise_beta_alpha": 1.5,
    "noise_beta_beta": 1.0,
    "noise_s": 0.999,
    "num_timestep_buckets": 1000,
    "max_num_embodiments": 32,
}

COSMOS_REASON2_2B = transformers.Qwen3VLConfig(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    tie_word_embeddings=True,
    text_config={
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 16,  # select_layer: upstream pops the 12 layers above
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 5000000,
        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    vision_config={
        "deepstack_visual_indexes": [5, 11, 17],
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 2048,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "hidden_act": "gelu_pytorch_tanh",
    },
)


def _fixture() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        qwen = transformers.Qwen3VLForConditionalGeneration(COSMOS_REASON2_2B)
    fixture = {}
    for name, p in qwen.named_parameters():
        if name.startswith("lm_head."):
            continue  # tied to embed_tokens (and never read)
        fixture["backbone.model." + name] = tuple(p.shape)
    assert any(k.startswith("backbone.model.model.visual.deepstack_merger_list.2.") for k in fixture)
    return fixture | published_head_shapes(132, 132, 32, 0)


def test_published_config_gives_the_n17_size() -> None:
    assert ckpt.config_from_json(N17_CONFIG_JSON) == SIZES["n1.7-3b"]
    # The other public default (Isaac-GR00T's dataclass: DiT 16 layers, select_layer 12, no adapter)
    # is read as written: the checkpoint's own config wins.
    other = copy.deepcopy(N17_CONFIG_JSON)
    other["select_layer"] = 12
    other["diffusion_model_cfg"]["num_layers"] = 16  # type: ignore[index]
    del other["vl_self_attention_cfg"]
    cfg = ckpt.config_from_json(other)
    assert (cfg.backbone.select_layer, cfg.head.dit.layers, cfg.head.vl_adapter.layers) == (12, 16, 0)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model_type", "gr00t_n1_5", "Gr00tN1d7"),
        ("use_alternate_vl_dit", False, "use_alternate_vl_dit"),
        ("select_layer", 3, "select_layer"),
        ("input_embedding_dim", 1024, "DiT width"),
        ("model_name", "Qwen/Qwen3-VL-4B-Instruct", "backbone_config.json"),
    ],
)
def test_unsupported_configs_are_refused(key: str, value: object, message: str) -> None:
    raw = copy.deepcopy(N17_CONFIG_JSON)
    raw[key] = value
    with pytest.raises(ModelLoadError, match=message):
        ckpt.config_from_json(raw)


def test_the_loader_reads_exactly_the_published_layout() -> None:
    cfg = ckpt.config_from_json(N17_CONFIG_JSON)
    with torch.device("meta"):
        model = Groot17(cfg)
    names = ckpt.n17_names(cfg)
    ours = checkpoint_shapes(names, model)
    fixture = _fixture()
    assert_same_layout(ours, fixture)
    for unused in (
        "backbone.model.lm_head.weight",
        "backbone.model.model.language_model.layers.16.mlp.up_proj.weight",
        "backbone.model.model.language_model.layers.27.input_layernorm.weight",
    ):
        assert names.unused(unused) and unused not in ours
    assert not names.unused("backbone.model.model.language_model.layers.15.mlp.up_proj.weight")
    # LeRobot (>= 0.6) saves the same tensors below "_groot_model."
    lerobot = checkpoint_shapes(ckpt.n17_names(cfg, prefix=ckpt.LEROBOT_PREFIX), model)
    assert set(lerobot) == {ckpt.LEROBOT_PREFIX + k for k in ours}


def test_parameter_count() -> None:
    with torch.device("meta"):
        total = sum(p.numel() for p in Groot17(SIZES["n1.7-3b"]).parameters())
    assert total == sum(int(torch.tensor(s).prod()) for s in _fixture().values())
    # 3.14B built: the LM cut at 16 layers 1.12B (of which the embedding 0.31B), the vision tower
    # 0.41B, the action head 1.62B (DiT 1.09B, VL adapter 0.20B, category-specific layers 0.33B).
    assert 3.10e9 < total < 3.18e9, total


def test_a_tiny_checkpoint_loads_through_the_real_loader(tmp_path: Path) -> None:
    path = write_tiny_groot17_checkpoint(tmp_path / "ckpt", seed=3)
    assert ckpt.model_type(path) == "Gr00tN1d7"
    cfg = ckpt.read_config(path)
    assert cfg == TINY
    model = ckpt.load_model(path, cfg, torch.float32, "cpu")
    from safetensors.torch import load_file

    key = "action_head.model.transformer_blocks.0.attn1.to_k.weight"
    stored = {k: v for f in sorted(path.glob("model-*.safetensors")) for k, v in load_file(str(f)).items()}
    block = model.action_head.dit.blocks[0]
    assert isinstance(block, TransformerBlock)
    assert torch.equal(block.attn.to_k.weight, stored[key])
    patch = "backbone.model.model.visual.patch_embed.proj.weight"  # a Conv3d there, a Linear here
    assert torch.equal(model.backbone.visual.patch_embed.weight, stored[patch].flatten(1))
    files = ckpt.read_processor_files(path)
    assert files.embodiment_id("libero_sim", cfg.head.max_num_embodiments) == 2
    libero = files.modalities["libero_sim"]
    assert libero["video"].modality_keys == ("image", "wrist_image")
    assert libero["action"].delta_indices == tuple(range(cfg.head.action_horizon))
    rel = files.modalities["oxe_droid_relative_eef_relative_joint"]["action"]
    assert rel.extra["action_configs"][0]["rep"] == "RELATIVE"
    assert files.statistics["libero_sim"]["action"]["x"]["q99"]
    backbone = ckpt.find_backbone_files(path, "")
    assert "<|image_pad|>" in backbone.chat_template


def test_missing_pieces_name_the_file(tmp_path: Path) -> None:
    path = write_tiny_groot17_checkpoint(tmp_path / "ckpt")
    (path / "chat_template.jinja").unlink()
    (path / "preprocessor_config.json").unlink()
    with pytest.raises(
        ModelLoadError, match=r"missing preprocessor_config\.json, chat_template\.jinja.*gated"
    ):
        ckpt.find_backbone_files(path, "")
    with pytest.raises(ModelLoadError, match=r"embodiment_id\.json has no projector index"):
        ckpt.read_processor_files(path).embodiment_id("gr1", 32)
    (path / "statistics.json").unlink()
    with pytest.raises(ModelLoadError, match=r"missing statistics\.json"):
        ckpt.read_processor_files(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    (path / "model-00002-of-00002.safetensors").unlink()
    assert index["weight_map"]
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors"):
        ckpt.load_model(path, TINY, torch.float32, "cpu")
