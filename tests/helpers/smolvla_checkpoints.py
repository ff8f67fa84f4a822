"""Tiny random SmolVLA checkpoints in LeRobot's on-disk format, and a tiny SmolVLM2-style backbone
directory (its config.json and tokenizer files), for tests.

    write_tiny_vlm_dir(path)                      SmolVLM config.json + tokenizer.json +
                                                  tokenizer_config.json + special_tokens_map.json
    write_tiny_checkpoint(path, vlm_dir, ...)     config.json (type smolvla), model.safetensors,
                                                  policy_preprocessor.json / policy_postprocessor.json
                                                  with their normaliser .safetensors
    write_tiny_smolvla(path)                      both in one directory (the backbone in
                                                  <path>/smolvlm/): VLA_MODEL_PATH alone serves it

The layout is what LeRobot 0.4.4's save_pretrained writes (checked against a checkpoint LeRobot
saved itself: tests/fixtures/smolvla/). The tokenizer is a byte-level BPE trained on a few
sentences with `tokenizers`, with SmolVLM2's special tokens and its padding token <|im_end|> = 2.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_inference.models.common.init import init_random_weights
from vla_inference.models.smolvla import checkpoint as ckpt
from vla_inference.models.smolvla.model import SmolVLAConfig, build

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    "<end_of_utterance>",
)
CORPUS = (
    "pick up the red cube and place it in the box",
    "put the toy in the bin, then push the drawer closed",
    "grasp the green bottle; open the gripper slowly",
    "stack the blocks: blue on yellow, yellow on red",
    "move the arm to the left and lift the lid",
)

# The tiny backbone: SmolVLM config (6 text layers, of which the checkpoint keeps 2 or 4).
TINY_VLM = {
    "model_type": "smolvlm",
    "architectures": ["SmolVLMForConditionalGeneration"],
    "scale_factor": 4,
    "image_token_id": 4,
    "tie_word_embeddings": False,
    "vocab_size": 320,
    "text_config": {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000,
        "vocab_size": 320,
        "pad_token_id": 2,
        "max_position_embeddings": 512,
    },
    "vision_config": {
        "model_type": "smolvlm_vision",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 8,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh",
    },
}


def build_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer (a `tokenizers.Tokenizer`) shaped like SmolVLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    return tokenizer


def write_tiny_vlm_dir(path: Path, text_layers: int = 6) -> Path:
    """The tiny SmolVLM2 stand-in: config.json, tokenizer.json and the special-token files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(TINY_VLM))
    config["text_config"]["num_hidden_layers"] = text_layers
    (path / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer().save(str(path / "tokenizer.json"))
    special = {
        "bos_token": "<|im_start|>",
        "eos_token": "<end_of_utterance>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
    }
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": 512,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": {
            "fake_image_token": "<fake_token_around_image>",
            "image_token": "<image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        **special,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return path


def tiny_stats(state_dim: int, action_dim: int) -> dict[str, dict[str, list[float]]]:
    """Distinct, non-trivial mean/std/min/max per feature."""

    def stats(n: int, base: float) -> dict[str, list[float]]:
        mean = [base + 0.25 * i for i in range(n)]
        std = [0.5 + 0.1 * i for i in range(n)]
        return {
            "mean": mean,
            "std": std,
            "min": [m - 2.0 for m in mean],
            "max": [m + 2.5 for m in mean],
        }

    return {"observation.state": stats(state_dim, 0.3), "action": stats(action_dim, -0.7)}


def _feature(kind: str, shape: Sequence[int]) -> dict[str, Any]:
    return {"type": kind, "shape": list(shape)}


def policy_config(
    vlm_dir: Path,
    *,
    num_vlm_layers: int = 4,
    state_dim: int = 6,
    action_dim: int = 5,
    cameras: Sequence[str] = ("observation.images.camera1", "observation.images.camera2"),
    empty_cameras: int = 1,
    chunk_size: int = 6,
    tokenizer_max_length: int = 12,
    vlm_model_name: str | None = None,
) -> dict[str, Any]:
    """config.json as LeRobot 0.4.4 writes it for a smolvla policy (the fields it saves);
    `vlm_model_name` defaults to the backbone directory's path."""
    inputs = {"observation.state": _feature("STATE", [state_dim])}
    inputs |= {name: _feature("VISUAL", [3, 48, 80]) for name in cameras}
    inputs |= {
        f"observation.images.empty_camera_{i}": _feature("VISUAL", [3, 480, 640])
        for i in range(empty_cameras)
    }
    size = TINY_VLM["vision_config"]["image_size"]  # type: ignore[index]
    return {
        "type": "smolvla",
        "n_obs_steps": 1,
        "input_features": inputs,
        "output_features": {"action": _feature("ACTION", [action_dim])},
        "device": "cpu",
        "use_amp": False,
        "use_peft": False,
        "push_to_hub": False,
        "repo_id": None,
        "private": None,
        "tags": None,
        "license": None,
        "pretrained_path": None,
        "chunk_size": chunk_size,
        "n_action_steps": chunk_size,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
        "max_state_dim": 32,
        "max_action_dim": 32,
        "resize_imgs_with_padding": [size, size],
        "empty_cameras": empty_cameras,
        "adapt_to_pi_aloha": False,
        "use_delta_joint_actions_aloha": False,
        "tokenizer_max_length": tokenizer_max_length,
        "num_steps": 10,
        "use_cache": True,
        "freeze_vision_encoder": True,
        "train_expert_only": True,
        "train_state_proj": True,
        "optimizer_lr": 0.0001,
        "optimizer_betas": [0.9, 0.95],
        "optimizer_eps": 1e-08,
        "optimizer_weight_decay": 1e-10,
        "optimizer_grad_clip_norm": 10,
        "scheduler_warmup_steps": 1000,
        "scheduler_decay_steps": 30000,
        "scheduler_decay_lr": 2.5e-06,
        "vlm_model_name": str(vlm_dir) if vlm_model_name is None else vlm_model_name,
        "load_vlm_weights": False,
        "add_image_special_tokens": False,
        "attention_mode": "cross_attn",
        "prefix_length": -1,
        "pad_language_to": "max_length",
        "num_expert_layers": -1,
        "num_vlm_layers": num_vlm_layers,
        "self_attn_every_n_layers": 2,
        "expert_width_multiplier": 0.75,
        "min_period": 0.004,
        "max_period": 4.0,
        "rtc_config": None,
        "compile_model": False,
        "compile_mode": "max-autotune",
    }


def _processor_json(name: str, steps: list[dict[str, Any]]) -> str:
    return json.dumps({"name": name, "steps": steps}, indent=2)


def write_processors(
    path: Path,
    config: Mapping[str, Any],
    stats: Mapping[str, Mapping[str, Sequence[float]]] | None,
    *,
    normalizer_step: int = 5,
    dataset_keys: Sequence[str] = (),
) -> None:
    """policy_preprocessor.json / policy_postprocessor.json and their normaliser state files, as
    LeRobot's make_smolvla_pre_post_processors saves them. `dataset_keys`: write the statistics
    under "<key>.buffer.<feature>.<stat>" only (the migrated base checkpoint's form)."""
    from safetensors.torch import save_file

    features = {**config["input_features"], **config["output_features"]}
    norm_map = config["normalization_mapping"]
    tensors: dict[str, torch.Tensor] = {}
    for feature, values in (stats or {}).items():
        for stat, vector in values.items():
            tensor = torch.tensor(vector, dtype=torch.float32)
            if dataset_keys:
                for i, key in enumerate(dataset_keys):
                    tensors[f"{key}.buffer.{feature}.{stat}"] = tensor + i
            else:
                tensors[f"{feature}.{stat}"] = tensor
    pre_state = f"policy_preprocessor_step_{normalizer_step}_normalizer_processor.safetensors"
    post_state = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    save_file(tensors, str(path / pre_state))
    post_tensors = {k: v for k, v in tensors.items() if ".action." in f".{k}"}
    save_file(post_tensors, str(path / post_state))
    tokenizer_step = {
        "registry_name": "tokenizer_processor",
        "config": {
            "max_length": config["tokenizer_max_length"],
            "task_key": "task",
            "padding_side": "right",
            "padding": config["pad_language_to"],
            "truncation": True,
            "tokenizer_name": config["vlm_model_name"],
        },
    }
    leading = [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "smolvla_new_line_processor", "config": {}},
        tokenizer_step,
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}},
    ][:normalizer_step]
    normalizer = {
        "registry_name": "normalizer_processor",
        "config": {"eps": 1e-08, "features": features, "norm_map": norm_map},
        "state_file": pre_state,
    }
    (path / "policy_preprocessor.json").write_text(
        _processor_json("policy_preprocessor", [*leading, normalizer])
    )
    unnormalizer = {
        "registry_name": "unnormalizer_processor",
        "config": {"eps": 1e-08, "features": dict(config["output_features"]), "norm_map": norm_map},
        "state_file": post_state,
    }
    device = {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}
    (path / "policy_postprocessor.json").write_text(
        _processor_json("policy_postprocessor", [unnormalizer, device])
    )


def tiny_model_config(vlm_dir: Path, config: Mapping[str, Any]) -> SmolVLAConfig:
    """Our SmolVLAConfig for a tiny checkpoint (through the loader's own reading)."""
    return ckpt.smolvla_config(config, ckpt.read_backbone(vlm_dir / "config.json"), Path("config.json"))


def write_tiny_checkpoint(
    path: Path,
    vlm_dir: Path,
    seed: int = 0,
    *,
    stats: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    dataset_keys: Sequence[str] = (),
    compiled: bool = False,
    legacy_stats: bool = False,
    normalizer_step: int = 5,
    **config_changes: Any,
) -> Path:
    """A tiny SmolVLA checkpoint in LeRobot's format with random weights from `seed`.

    compiled       keys as a torch.compile'd module saves them ("_orig_mod." after "model.")
    legacy_stats   statistics as pre-0.4 checkpoints keep them: normalize_inputs.buffer_* keys
                   in model.safetensors, no processor files
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = policy_config(vlm_dir, **config_changes)
    cfg = tiny_model_config(vlm_dir, config)
    model = build(cfg)
    init_random_weights(model, seed)
    tensors = ckpt.lerobot_names().to_checkpoint(model.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    tensors[ckpt.LM_HEAD] = torch.randn(cfg.vocab_size, cfg.vlm.width, generator=g) * 0.02  # unused
    state_dim = config["input_features"]["observation.state"]["shape"][0]
    action_dim = config["output_features"]["action"]["shape"][0]
    stats = tiny_stats(state_dim, action_dim) if stats is None else stats
    if compiled:
        tensors = {"model._orig_mod." + k.removeprefix("model."): v for k, v in tensors.items()}
    if legacy_stats:
        for feature, values in stats.items():
            group = "normalize_inputs" if feature.startswith("observation.") else "normalize_targets"
            for stat, vector in values.items():
                name = feature.replace(".", "_")
                tensors[f"{group}.buffer_{name}.{stat}"] = torch.tensor(vector, dtype=torch.float32)
                if group == "normalize_targets":
                    tensors[f"unnormalize_outputs.buffer_{name}.{stat}"] = torch.tensor(vector)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=4))
    if not legacy_stats:
        write_processors(path, config, stats, normalizer_step=normalizer_step, dataset_keys=dataset_keys)
    return path


def observation_arrays(seed: int, state_dim: int = 6) -> dict[str, np.ndarray]:
    """A deterministic raw observation: two 48 x 80 images in [0, 1] and a state."""
    rng = np.random.default_rng(seed)
    return {
        "observation.images.camera1": rng.random((3, 48, 80), dtype=np.float32),
        "observation.images.camera2": rng.random((3, 48, 80), dtype=np.float32),
        "observation.state": rng.normal(size=state_dim).astype(np.float32),
    }


BACKBONE_DIR = "smolvlm"  # write_tiny_smolvla's backbone, named relative to the checkpoint


def write_tiny_smolvla(path: Path, seed: int = 0, **changes: Any) -> Path:
    """A self-contained tiny SmolVLA checkpoint: LeRobot's files, and the tiny backbone (its
    config.json and tokenizer) in <path>/smolvlm/, which config.json's vlm_model_name names relative
    to the checkpoint directory; so VLA_MODEL_PATH alone serves it (`make run`, the benchmarks)."""
    path = Path(path)
    vlm_dir = write_tiny_vlm_dir(path / BACKBONE_DIR)
    return write_tiny_checkpoint(path, vlm_dir, seed, vlm_model_name=BACKBONE_DIR, **changes)
