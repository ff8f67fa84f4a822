"""Tiny GR00T N1.7 checkpoints in NVIDIA's on-disk layout (Isaac-GR00T's save_pretrained), for tests.

write_tiny_groot17_checkpoint(path) writes:
    config.json                       model_type Gr00tN1d7, the head's sizes, diffusion_model_cfg,
                                      vl_self_attention_cfg, model_name nvidia/Cosmos-Reason2-2B
    backbone_config.json              the tiny Qwen3-VL config (the real one comes from the backbone)
    model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json   random weights (seeded),
                                      NVIDIA's names, + backbone.model.lm_head.weight and one LM layer
                                      above select_layer (in real checkpoints; the loader skips them)
    processor_config.json, statistics.json, embodiment_id.json    two embodiments: libero_sim
                                      (absolute) and a relative-joint one, percentile statistics
    tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json,
    video_preprocessor_config.json    a word-level tokenizer with Qwen3-VL's special tokens and a
                                      Qwen3-VL-style chat template; Qwen2-VL image processor settings
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.helpers.groot_checkpoints import statistics_around, well_conditioned
from tests.helpers.shards import write_two_shards
from vla_inference.models.groot.n17 import SIZES, Groot17, Groot17Config
from vla_inference.models.groot.n17_checkpoint import n17_names

TINY = SIZES["tiny"]

WORDS = ["user", "assistant", "system", "pick", "up", "the", "red", "cube", "and", "place", "it", "in"]
WORDS += ["box", "open", "drawer", "put", "bowl", "on", "plate", "a", "to", "of"]
SPECIAL = {
    "<|endoftext|>": 149,
    "<|image_pad|>": 150,
    "<|video_pad|>": 151,
    "<|vision_start|>": 152,
    "<|vision_end|>": 153,
    "<|im_start|>": 154,
    "<|im_end|>": 155,
}

# Qwen3-VL's template, reduced to what GR00T renders: one user turn, images then text.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'text' -%}{{- content['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LIBERO_KEYS = [("x", 1), ("y", 1), ("z", 1), ("roll", 1), ("pitch", 1), ("yaw", 1), ("gripper", 1)]
RELATIVE_KEYS = [("joint_position", 4), ("gripper_position", 1)]
EMBODIMENT_IDS = {"libero_sim": 2, "oxe_droid_relative_eef_relative_joint": 24, "new_embodiment": 10}


def backbone_config_json(c: Groot17Config = TINY) -> dict[str, Any]:
    """The tiny backbone as a Qwen3-VL config.json (the fields transformers' Qwen3VLConfig reads)."""
    b, v = c.backbone, c.backbone.vision
    return {
        "model_type": "qwen3_vl",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": b.image_token_id,
        "video_token_id": b.video_token_id,
        "vision_start_token_id": b.vision_start_id,
        "vision_end_token_id": b.vision_end_id,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": b.vocab_size,
            "hidden_size": b.text.width,
            "intermediate_size": b.text.mlp_dim,
            "num_hidden_layers": b.text.depth,
            "num_attention_heads": b.text.num_heads,
            "num_key_value_heads": b.text.num_kv_heads,
            "head_dim": b.text.head_dim,
            "rms_norm_eps": b.text.norm_eps,
            "rope_theta": b.text.rope_theta,
            "rope_scaling": {
                "rope_type": "default",
                "mrope_section": list(b.mrope_section),
                "mrope_interleaved": True,
            },
            "max_position_embeddings": 4096,
            "hidden_act": "silu",
            "attention_bias": False,
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "model_type": "qwen3_vl",
            "depth": v.depth,
            "hidden_size": v.width,
            "intermediate_size": v.mlp_dim,
            "num_heads": v.num_heads,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.merge,
            "num_position_embeddings": v.num_position_embeddings,
            "out_hidden_size": v.out_width,
            "deepstack_visual_indexes": list(v.deepstack),
            "hidden_act": "gelu_pytorch_tanh",
            "in_channels": 3,
        },
    }


def config_json(c: Groot17Config = TINY, model_name: str = "nvidia/Cosmos-Reason2-2B") -> dict[str, Any]:
    """config.json as Isaac-GR00T writes it (Gr00tN1d7Config fields; those that shape the network)."""
    h = c.head
    out: dict[str, Any] = {
        "model_type": "Gr00tN1d7",
        "architectures": ["Gr00tN1d7"],
        "model_name": model_name,
        "backbone_model_type": "qwen",
        "model_dtype": "bfloat16",
        "select_layer": c.backbone.select_layer,
        "backbone_embedding_dim": h.backbone_embedding_dim,
        "reproject_vision": False,
        "use_flash_attention": False,
        "load_bf16": False,
        "image_crop_size": None,
        "image_target_size": [c.image_size, c.image_size],
        "max_state_dim": h.max_state_dim,
        "max_action_dim": h.action_dim,
        "action_horizon": h.action_horizon,
        "hidden_size": h.hidden_size,
        "input_embedding_dim": h.input_embedding_dim,
        "state_history_length": h.state_history,
        "add_pos_embed": h.add_pos_embed,
        "attn_dropout": 0.2,
        "use_vlln": h.use_vlln,
        "max_seq_len": h.max_seq_len,
        "use_alternate_vl_dit": True,
        "attend_text_every_n_blocks": h.dit.attend_text_every_n_blocks,
        "diffusion_model_cfg": {
            "positional_embeddings": None,
            "num_layers": h.dit.layers,
            "num_attention_heads": h.dit.heads,
            "attention_head_dim": h.dit.head_dim,
            "norm_type": "ada_norm",
            "dropout": 0.2,
            "final_dropout": True,
            "output_dim": h.dit.output_dim,
            "interleave_self_attention": True,
        },
        "num_inference_timesteps": h.num_inference_timesteps,
        "noise_beta_alpha": 1.5,
        "noise_beta_beta": 1.0,
        "noise_s": 0.999,
        "num_timestep_buckets": h.num_timestep_buckets,
        "state_dropout_prob": 0.0,
        "max_num_embodiments": h.max_num_embodiments,
        "use_percentiles": True,
        "use_relative_action": True,
    }
    if h.vl_adapter.layers:
        out["vl_self_attention_cfg"] = {
            "positional_embeddings": None,
            "num_layers": h.vl_adapter.layers,
            "num_attention_heads": h.vl_adapter.heads,
            "attention_head_dim": h.vl_adapter.head_dim,
            "dropout": 0.2,
            "final_dropout": True,
        }
    return out


def processor_files(c: Groot17Config = TINY, model_name: str = "nvidia/Cosmos-Reason2-2B") -> dict[str, Any]:
    """processor_config.json, statistics.json, embodiment_id.json (as Gr00tN1d7Processor saves them)."""
    horizon = c.head.action_horizon
    libero = {
        "video": {"delta_indices": [0], "modality_keys": ["image", "wrist_image"]},
        "state": {"delta_indices": [0], "modality_keys": [k for k, _ in LIBERO_KEYS]},
        "action": {"delta_indices": list(range(horizon)), "modality_keys": [k for k, _ in LIBERO_KEYS]},
        "language": {"delta_indices": [0], "modality_keys": ["annotation.human.action.task_description"]},
    }
    relative = {
        "video": {"delta_indices": [-15, 0], "modality_keys": ["exterior_image_1_left"]},
        "state": {"delta_indices": [0], "modality_keys": [k for k, _ in RELATIVE_KEYS]},
        "action": {
            "delta_indices": list(range(horizon)),
            "modality_keys": [k for k, _ in RELATIVE_KEYS],
            "action_configs": [
                {"rep": "RELATIVE", "type": "NON_EEF", "format": "DEFAULT", "state_key": "joint_position"},
                {"rep": "ABSOLUTE", "type": "NON_EEF", "format": "DEFAULT", "state_key": "gripper_position"},
            ],
        },
        "language": {"delta_indices": [0], "modality_keys": ["annotation.language.language_instruction"]},
    }
    kwargs = {
        "modality_configs": {"libero_sim": libero, "oxe_droid_relative_eef_relative_joint": relative},
        "image_crop_size": None,
        "image_target_size": [c.image_size, c.image_size],
        "use_albumentations": True,
        "random_rotation_angle": None,
        "color_jitter_params": None,
        "shortest_image_edge": c.image_size,
        "crop_fraction": 0.95,
        "letter_box_transform": False,
        "model_name": model_name,
        "model_type": "qwen",
        "formalize_language": True,
        "max_state_dim": c.head.max_state_dim,
        "max_action_dim": c.head.action_dim,
        "max_action_horizon": horizon,
        "use_percentiles": True,
        "use_mean_std": False,
        "clip_outliers": True,
        "apply_sincos_state_encoding": False,
        "use_relative_action": True,
        "exclude_state": False,
        "state_dropout_prob": 0.0,
    }
    statistics: dict[str, Any] = {}
    for seed, (tag, keys) in enumerate((("libero_sim", LIBERO_KEYS), (
        "oxe_droid_relative_eef_relative_joint", RELATIVE_KEYS))):  # fmt: skip
        entry: dict[str, Any] = {"state": {}, "action": {}, "relative_action": {}}
        for i, (key, dim) in enumerate(keys):
            entry["state"][key] = statistics_around(dim, 0.3 * seed + 0.1 * i)
            entry["action"][key] = statistics_around(dim, 0.5 + 0.3 * seed + 0.1 * i)
        if tag != "libero_sim":
            entry["relative_action"]["joint_position"] = statistics_around(4, -0.5)
        statistics[tag] = entry
    return {
        "processor_config.json": {"processor_class": "Gr00tN1d7Processor", "processor_kwargs": kwargs},
        "statistics.json": statistics,
        "embodiment_id.json": dict(EMBODIMENT_IDS),
    }


def write_backbone_files(path: Path, c: Groot17Config = TINY) -> None:
    """Tokenizer + image processor files in the layout Qwen3VLProcessor.from_pretrained reads."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    vocab.update(SPECIAL)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "pad_token": "<|endoftext|>",
                "eos_token": "<|im_end|>",
                "unk_token": "<unk>",
                "model_max_length": 4096,
                "padding_side": "left",
                "extra_special_tokens": {
                    "image_token": "<|image_pad|>",
                    "video_token": "<|video_pad|>",
                    "vision_bos_token": "<|vision_start|>",
                    "vision_eos_token": "<|vision_end|>",
                },
            },
            indent=2,
        )
    )
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    v = c.backbone.vision
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "merge_size": v.merge,
        "size": {"shortest_edge": (v.patch_size * v.merge) ** 2, "longest_edge": 1 << 24},
    }
    (path / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    video = {**image, "video_processor_type": "Qwen3VLVideoProcessor", "fps": 2, "do_sample_frames": False}
    video.pop("image_processor_type")
    (path / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))


def tiny_state_dict(seed: int, cfg: Groot17Config = TINY) -> dict[str, torch.Tensor]:
    """Random, well-conditioned weights in NVIDIA's names (norm gains random too)."""
    torch.manual_seed(seed)
    state = well_conditioned(Groot17(cfg))
    return n17_names(cfg).to_checkpoint(state)


def write_tiny_groot17_checkpoint(path: Path, seed: int = 0, cfg: Groot17Config = TINY) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_json(cfg), indent=2))
    (path / "backbone_config.json").write_text(json.dumps(backbone_config_json(cfg), indent=2))
    for name, data in processor_files(cfg).items():
        (path / name).write_text(json.dumps(data, indent=2))
    write_backbone_files(path, cfg)

    state = tiny_state_dict(seed, cfg)
    lm = "backbone.model.model.language_model."
    state["backbone.model.lm_head.weight"] = state[lm + "embed_tokens.weight"].clone()
    state[f"{lm}layers.{cfg.backbone.select_layer}.input_layernorm.weight"] = torch.ones(
        cfg.backbone.text.width
    )
    write_two_shards(path, state)
    return path
