"""Tiny GR00T N1.5 checkpoints in the published on-disk layout, for tests.

write_tiny_groot_checkpoint(path) writes:
    config.json                       model_type gr00t_n1_5; backbone_cfg.eagle_config = tiny Eagle dims
    model-00001-of-00002.safetensors  random weights (seeded), split over two shards
    model-00002-of-00002.safetensors  + one LM layer above select_layer (upstream pops those; skipped)
    model.safetensors.index.json
    experiment_cfg/metadata.json      two embodiments with distinct dims, stats, modes, cameras
    tokenizer.json                    word-level tokenizer with the Eagle special tokens
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tests.helpers.shards import write_two_shards
from vla_inference.models.groot.checkpoint import groot_names
from vla_inference.models.groot.model import GR00TN15, SIZES, GrootConfig

TINY = SIZES["tiny"]

# Per embodiment: state / action modalities (name, dim) in metadata order (alphabetical, as
# upstream writes it), video keys, normalisation overrides (our metadata extension), rotation types.
# gr1 is served with NVIDIA's fourier_gr1_arms_only (left_arm, right_arm, left_hand, right_hand;
# state as sin/cos; waist ignored); the others with their metadata keys in order, min_max unless
# "modes" says otherwise (oxe_droid with NVIDIA's oxe_droid config).
EMBODIMENT_LAYOUTS: dict[str, dict[str, Any]] = {
    "gr1": {
        "state": [("left_arm", 2), ("left_hand", 1), ("right_arm", 2), ("right_hand", 1), ("waist", 1)],
        "action": [("left_arm", 2), ("left_hand", 1), ("right_arm", 2), ("right_hand", 1), ("waist", 1)],
        "video": ["ego_view"],
        "modes": {},
    },
    "new_embodiment": {
        "state": [("single_arm", 5), ("gripper", 1)],
        "action": [("single_arm", 5), ("gripper", 1)],
        "video": ["front", "wrist"],
        "modes": {"state.single_arm": "mean_std", "action.gripper": "q99"},
    },
    "so100": {
        "state": [("single_arm", 5), ("gripper", 1)],
        "action": [("single_arm", 5), ("gripper", 1)],
        "video": ["front", "wrist"],
        "modes": {},
    },
    "oxe_droid": {
        "state": [("eef_position", 3), ("eef_rotation", 4), ("gripper_position", 1)],
        "action": [("eef_position_delta", 3), ("eef_rotation_delta", 3), ("gripper_position", 1)],
        "video": ["exterior_image_1", "exterior_image_2", "wrist_image"],
        "modes": {},
        "rotations": {"state.eef_rotation": "quaternion", "action.eef_rotation_delta": "euler_angles_rpy"},
    },
}

# The gr1 order fourier_gr1_arms_only serves (what a robot sends and receives).
GR1_ARMS_ONLY = [("left_arm", 2), ("right_arm", 2), ("left_hand", 1), ("right_hand", 1)]

WORDS = ["pick", "up", "the", "red", "cube", "place", "it", "in", "box", "wave", "warm", "Perform", "default"]
WORDS += [
    "behavior",
    "image",
    "user",
    "assistant",
    "system",
    "You",
    "are",
    "a",
    "helpful",
    "[",
    "]",
    "'",
    "<",
    ">",
    "['",
    "']",
    ".",
    "1",
    "2",
    "3",
]
SPECIAL = {
    "<|im_start|>": 90,
    "<|im_end|>": 91,
    "<img>": 92,
    "</img>": 93,
    "<|endoftext|>": 94,
    "<IMG_CONTEXT>": 95,
}


def tiny_statistics(tag: str, kind: str, key: str, dim: int, seed: int) -> dict[str, list[float]]:
    """Distinct, hand-checkable statistics: min < q01 < mean < q99 < max per dimension."""
    offset = {"gr1": 0.0, "new_embodiment": 10.0, "so100": -5.0}.get(tag, 1.0) + (
        0.5 if kind == "action" else 0.0
    )
    return statistics_around(dim, offset + 0.25 * seed + len(key) * 0.01)


def statistics_around(dim: int, offset: float) -> dict[str, list[float]]:
    """min < q01 < mean < q99 < max per dimension, spreading with the index, around `offset`."""
    low = [offset - 1.0 - 0.5 * i for i in range(dim)]
    high = [offset + 2.0 + 1.0 * i for i in range(dim)]
    return {
        "min": low,
        "max": high,
        "q01": [lo + 0.1 for lo in low],
        "q99": [hi - 0.1 for hi in high],
        "mean": [(lo + hi) / 2 for lo, hi in zip(low, high, strict=True)],
        "std": [0.5 + 0.1 * i for i in range(dim)],
    }


def tiny_metadata(embodiments: Sequence[str], seed: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in embodiments:
        layout = EMBODIMENT_LAYOUTS[tag]
        entry: dict[str, Any] = {
            "statistics": {"state": {}, "action": {}},
            "modalities": {
                "video": {k: {"resolution": [64, 48], "channels": 3, "fps": 20.0} for k in layout["video"]},
                "state": {},
                "action": {},
            },
            "embodiment_tag": tag,
        }
        rotations = layout.get("rotations", {})
        for kind in ("state", "action"):
            for key, dim in layout[kind]:
                entry["statistics"][kind][key] = tiny_statistics(tag, kind, key, dim, seed)
                entry["modalities"][kind][key] = {
                    "absolute": True,
                    "rotation_type": rotations.get(f"{kind}.{key}"),
                    "shape": [dim],
                    "continuous": True,
                }
        if layout["modes"]:
            entry["normalization_modes"] = dict(layout["modes"])
        out[tag] = entry
    return out


# nvidia/GR00T-N1.5-3B's experiment_cfg/metadata.json lists, for gr1, every body part of its
# pretraining data, keys alphabetical: 44 state and 44 action values (more than the model's 32).
BASE_MODEL_GR1 = [
    ("left_arm", 7),
    ("left_hand", 6),
    ("left_leg", 6),
    ("neck", 3),
    ("right_arm", 7),
    ("right_hand", 6),
    ("right_leg", 6),
    ("waist", 3),
]


def base_model_metadata() -> dict[str, Any]:
    """A metadata.json shaped like the published base checkpoint's (one gr1 entry, eight body parts,
    a 256 x 256 ego_view camera, all six statistics per key)."""
    entry: dict[str, Any] = {
        "statistics": {"state": {}, "action": {}},
        "modalities": {
            "video": {"ego_view": {"resolution": [256, 256], "channels": 3, "fps": 20.0}},
            "state": {},
            "action": {},
        },
        "embodiment_tag": "gr1",
    }
    for kind in ("state", "action"):
        for key, dim in BASE_MODEL_GR1:
            entry["statistics"][kind][key] = tiny_statistics("gr1", kind, key, dim, 0)
            entry["modalities"][kind][key] = {
                "absolute": True,
                "rotation_type": None,
                "shape": [dim],
                "continuous": True,
            }
    return {"gr1": entry}


def tiny_config_json(lerobot: bool = False, c: GrootConfig = TINY) -> dict[str, Any]:
    bb, vision, llm = c.backbone, c.backbone.vision, c.backbone.llm
    head, dit, vlsa = c.head, c.head.dit, c.head.vl_adapter
    return {
        **({"type": "groot"} if lerobot else {}),
        "model_type": "gr00t_n1_5",
        "architectures": ["GR00T_N1_5"],
        "action_horizon": c.action_horizon,
        "action_dim": c.action_dim,
        "compute_dtype": "bfloat16",
        "backbone_cfg": {
            "select_layer": bb.select_layer,
            "project_to_dim": None,
            "reproject_vision": False,
            "eagle_config": {
                "force_image_size": vision.image_size,
                "use_pixel_shuffle": False,
                "mlp_connector_layers": 1,
                "downsample_ratio": 0.5,
                "image_token_index": bb.image_token_id,
                "text_config": {
                    "architectures": ["Qwen3ForCausalLM"],
                    "vocab_size": bb.vocab_size,
                    "hidden_size": llm.width,
                    "num_hidden_layers": llm.depth,
                    "num_attention_heads": llm.num_heads,
                    "num_key_value_heads": llm.num_kv_heads,
                    "head_dim": llm.head_dim,
                    "intermediate_size": llm.mlp_dim,
                    "rope_theta": llm.rope_theta,
                    "rms_norm_eps": llm.norm_eps,
                },
                "vision_config": {
                    "model_type": "siglip_vision_model",
                    "hidden_size": vision.width,
                    "num_hidden_layers": vision.depth,
                    "num_attention_heads": vision.num_heads,
                    "intermediate_size": vision.mlp_dim,
                    "patch_size": vision.patch_size,
                    "image_size": vision.image_size,
                    "layer_norm_eps": vision.norm_eps,
                },
            },
        },
        "action_head_cfg": {
            "action_dim": head.action_dim,
            "action_horizon": head.action_horizon,
            "add_pos_embed": True,
            "backbone_embedding_dim": head.backbone_embedding_dim,
            "hidden_size": head.hidden_size,
            "input_embedding_dim": head.input_embedding_dim,
            "max_action_dim": head.action_dim,
            "max_state_dim": head.max_state_dim,
            "max_seq_len": head.max_seq_len,
            "num_inference_timesteps": head.num_inference_timesteps,
            "num_target_vision_tokens": head.num_target_vision_tokens,
            "num_timestep_buckets": head.num_timestep_buckets,
            "use_vlln": True,
            "diffusion_model_cfg": {
                "attention_head_dim": dit.head_dim,
                "cross_attention_dim": dit.cross_attention_dim,
                "interleave_self_attention": True,
                "norm_type": "ada_norm",
                "num_attention_heads": dit.heads,
                "num_layers": dit.layers,
                "output_dim": dit.output_dim,
                "positional_embeddings": None,
            },
            "vl_self_attention_cfg": {
                "attention_head_dim": vlsa.head_dim,
                "num_attention_heads": vlsa.heads,
                "num_layers": vlsa.layers,
                "positional_embeddings": None,
            },
        },
    }


def write_tiny_tokenizer(file: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    for token, index in SPECIAL.items():
        vocab[token] = index
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tokenizer.save(str(file))


def tiny_state_dict(seed: int, cfg: GrootConfig = TINY) -> dict[str, torch.Tensor]:
    """Random, well-conditioned weights in the checkpoint's names (well_conditioned)."""
    torch.manual_seed(seed)
    state = well_conditioned(GR00TN15(cfg))
    return groot_names(cfg).to_checkpoint(state)


def well_conditioned(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter random (norm gains included), drawn in parameter order from torch's global
    generator, with fan-in scaled matrices so activations stay O(1) and float32 noise stays small
    (GR00T N1.5 and N1.7 alike)."""
    state = {}
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        if name.endswith(".W"):  # category-specific (categories, in, out)
            value = torch.randn(shape) / shape[1] ** 0.5
        elif name.endswith(("embed_tokens.weight", "position_embedding", "future_tokens", "pos_embed")):
            value = 0.5 * torch.randn(shape)
        elif p.ndim >= 2:  # Linear (out, in) / Conv (out, in, k, k)
            fan_in = int(torch.tensor(shape[1:]).prod())
            value = torch.randn(shape) / fan_in**0.5
        elif name.endswith(".weight"):  # LayerNorm / RMSNorm gains
            value = 1.0 + 0.1 * torch.randn(shape)
        else:  # biases
            value = 0.05 * torch.randn(shape)
        state[name] = value.contiguous()
    return state


def write_tiny_groot_checkpoint(
    path: Path,
    seed: int = 0,
    embodiments: Sequence[str] = ("gr1", "new_embodiment"),
    lerobot: bool = False,
    metadata: dict[str, Any] | None = None,
    sizes: GrootConfig = TINY,
) -> Path:
    path = Path(path)
    (path / "experiment_cfg").mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(tiny_config_json(lerobot, sizes), indent=2))
    meta = metadata if metadata is not None else tiny_metadata(embodiments, seed)
    (path / "experiment_cfg" / "metadata.json").write_text(json.dumps(meta, indent=2))
    write_tiny_tokenizer(path / "tokenizer.json")

    state = tiny_state_dict(seed, sizes)
    # A layer above select_layer, as an untruncated Eagle LM would carry: the loader skips it.
    layer = sizes.backbone.select_layer
    extra = f"backbone.eagle_model.language_model.model.layers.{layer}.input_layernorm.weight"
    state[extra] = torch.ones(sizes.backbone.llm.width)
    write_two_shards(path, state)
    return path
