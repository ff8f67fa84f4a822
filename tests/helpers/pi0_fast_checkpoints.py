"""Tiny pi0-FAST checkpoints in LeRobot's on-disk format (policies/pi0_fast at 7427f31), for tests.

text_tokenizer()                  a tiny Gemma-style BPE (byte fallback, "▁" for spaces, <bos>
                                  prepended by the post-processor), vocabulary 1024
write_text_tokenizer(dir)         tokenizer.json + tokenizer_config.json, as transformers saves it
fast_tokenizer(seed)              a tiny FAST tokenizer: byte-level BPE trained with `tokenizers`
                                  on synthetic action chunks (10 x 3), scale 10, vocabulary 300
write_fast_tokenizer(dir, ...)    processor_config.json + bpe_tokenizer/ + a processing_*.py that
                                  records it was executed (the loader must never run it)
write_tiny_checkpoint(dir, seed)  config.json, model.safetensors (LeRobot's names: embedding and
                                  LM head as two tensors, SigLIP's unused pooling head included),
                                  normalizer processor files, tokenizer/, action_tokenizer/
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from vla_inference.models.common.init import init_random_weights
from vla_inference.models.pi0_fast import checkpoint as ckpt
from vla_inference.models.pi0_fast import fast_tokenizer as fast
from vla_inference.models.pi0_fast.model import SIZES, Pi0FastConfig, build

TEXT_VOCAB = 1024
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
CHARS = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:,;|.-\n"
WORDS = (
    "Task",
    "State",
    "Action",
    "▁State",
    "▁pick",
    "▁up",
    "▁the",
    "▁red",
    "▁block",
    "▁place",
    "▁it",
    "▁in",
    "▁bin",
    "▁open",
    "▁drawer",
)
FAST_HORIZON, FAST_DIM, FAST_SCALE, FAST_VOCAB = 10, 3, 10.0, 300
EXECUTED_MARKER = "EXECUTED_REMOTE_CODE"


# ---- the text tokenizer --------------------------------------------------------------------------


def text_tokenizer(vocab_size: int = TEXT_VOCAB) -> Tokenizer:
    """Gemma's pipeline at toy size: specials 0-4 (<pad> <eos> <bos> <unk> <mask>), byte fallback
    <0x00>..<0xFF>, single characters, a few whole words by merges, <unused*> filler, and the last
    128 ids <seg*> (as PaliGemma's). The FAST tokens land in the filler (ids vocab - 129 - f)."""
    pieces = list(SPECIALS) + [f"<0x{i:02X}>" for i in range(256)] + list(CHARS)
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        left = word[0]
        for ch in word[1:]:
            if (left, ch) not in merges:
                merges.append((left, ch))
            left += ch
            if left not in pieces:
                pieces.append(left)
    while len(pieces) < vocab_size - 128:
        pieces.append(f"<unused{len(pieces)}>")
    pieces += [f"<seg{i:03d}>" for i in range(128)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(" "), behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def write_text_tokenizer(directory: Path, vocab_size: int = TEXT_VOCAB) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text_tokenizer(vocab_size).save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory / "tokenizer.json"


# ---- the FAST tokenizer --------------------------------------------------------------------------


def synthetic_chunks(
    count: int, seed: int, horizon: int = FAST_HORIZON, dims: int = FAST_DIM
) -> list[np.ndarray]:
    """Smooth action chunks in roughly [-1, 1]: random walks of small steps plus an offset."""
    rng = np.random.default_rng(seed)
    return [
        np.clip(rng.uniform(-0.6, 0.6, dims) + np.cumsum(rng.normal(0, 0.08, (horizon, dims)), axis=0), -1, 1)
        for _ in range(count)
    ]


def fast_tokenizer(
    seed: int = 0, vocab_size: int = FAST_VOCAB, scale: float = FAST_SCALE
) -> fast.FastTokenizer:
    """A FAST tokenizer trained as the publisher's `fit` does: byte-level BPE over the strings
    chr(round(dct * scale) - min_token), the whole coefficient range as the initial alphabet."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.trainers import BpeTrainer

    chunks = synthetic_chunks(400, seed)
    coeffs = [np.around(fast.dct(c) * scale).astype(np.int64).reshape(-1) for c in chunks]
    low, high = int(min(c.min() for c in coeffs)), int(max(c.max() for c in coeffs))
    bpe = ByteLevelBPETokenizer()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=[chr(i) for i in range(high - low + 1)],
        max_token_length=10000,
    )
    bpe._tokenizer.train_from_iterator(
        ("".join(map(chr, (c - low).tolist())) for c in coeffs), trainer=trainer
    )
    return fast.FastTokenizer(
        bpe._tokenizer,
        scale=scale,
        min_token=low,
        vocab_size=vocab_size,
        time_horizon=FAST_HORIZON,
        action_dim=FAST_DIM,
    )


def write_fast_tokenizer(directory: Path, tokenizer: fast.FastTokenizer) -> Path:
    (directory / fast.BPE_DIR).mkdir(parents=True, exist_ok=True)
    auto_map = {"AutoProcessor": "processing_action_tokenizer.UniversalActionProcessor"}
    config = {
        "action_dim": tokenizer.action_dim,
        "auto_map": auto_map,
        "min_token": tokenizer.min_token,
        "processor_class": "UniversalActionProcessor",
        "scale": tokenizer.scale,
        "time_horizon": tokenizer.time_horizon,
        "vocab_size": tokenizer.vocab_size,
    }
    (directory / fast.CONFIG_FILE).write_text(json.dumps(config, indent=2))
    tokenizer.bpe.save(str(directory / fast.BPE_DIR / fast.BPE_FILE))
    bpe_config = {
        "auto_map": auto_map,
        "backend": "tokenizers",
        "clean_up_tokenization_spaces": False,
        "processor_class": "UniversalActionProcessor",
        "tokenizer_class": "TokenizersBackend",
    }
    (directory / fast.BPE_DIR / "tokenizer_config.json").write_text(json.dumps(bpe_config, indent=2))
    # the publisher's processor code sits here in real checkpoints; this one leaves a trace if run
    (directory / "processing_action_tokenizer.py").write_text(
        "from pathlib import Path\n\n"
        f"(Path(__file__).parent / {EXECUTED_MARKER!r}).write_text('executed')\n"
        "raise RuntimeError('a checkpoint file was executed')\n"
    )
    return directory


# ---- the checkpoint ------------------------------------------------------------------------------


def lerobot_config(
    cfg: Pi0FastConfig, state_dim: int, action_dim: int, *, chunk: int = FAST_HORIZON, max_length: int = 48
) -> dict[str, Any]:
    """config.json as LeRobot's PI0FastConfig saves it (its fields in its order), at test sizes."""
    size = cfg.vision.image_size
    return {
        "type": "pi0_fast",
        "n_obs_steps": 1,
        "input_features": {
            "observation.images.base_0_rgb": {"type": "VISUAL", "shape": [3, size, size]},
            "observation.images.left_wrist_0_rgb": {"type": "VISUAL", "shape": [3, size, size]},
            "observation.state": {"type": "STATE", "shape": [state_dim]},
        },
        "output_features": {"action": {"type": "ACTION", "shape": [action_dim]}},
        "device": "cpu",
        "use_amp": False,
        "use_peft": False,
        "push_to_hub": False,
        "repo_id": None,
        "private": None,
        "tags": None,
        "license": None,
        "pretrained_path": None,
        "pretrained_revision": None,
        "paligemma_variant": "dummy",
        "action_expert_variant": "gemma_300m",
        "dtype": "float32",
        "chunk_size": chunk,
        "n_action_steps": chunk,
        "max_state_dim": 32,
        "max_action_dim": 32,
        "max_action_tokens": 256,
        "use_relative_actions": False,
        "relative_exclude_joints": ["gripper"],
        "action_feature_names": None,
        "rtc_config": None,
        "image_resolution": [size, size],
        "empty_cameras": 0,
        "tokenizer_max_length": max_length,
        "text_tokenizer_name": "google/paligemma-3b-pt-224",
        "action_tokenizer_name": "lerobot/fast-action-tokenizer",
        "temperature": 0.0,
        "max_decoding_steps": 64,
        "fast_skip_tokens": 128,
        "validate_action_token_prefix": True,
        "use_kv_cache": True,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
        "gradient_checkpointing": False,
        "compile_model": False,
        "compile_mode": "max-autotune",
        "optimizer_lr": 2.5e-05,
        "optimizer_betas": [0.9, 0.95],
        "optimizer_eps": 1e-08,
        "optimizer_weight_decay": 0.01,
        "optimizer_grad_clip_norm": 1.0,
        "scheduler_warmup_steps": 1000,
        "scheduler_decay_steps": 30000,
        "scheduler_decay_lr": 2.5e-06,
    }


def tiny_stats(state_dim: int, action_dim: int) -> dict[str, dict[str, list[float]]]:
    return {
        "observation.state": {
            "mean": [0.1 * i - 0.2 for i in range(state_dim)],
            "std": [0.5 + 0.1 * i for i in range(state_dim)],
        },
        "action": {
            "mean": [0.05 * i + 0.3 for i in range(action_dim)],
            "std": [0.8 + 0.05 * i for i in range(action_dim)],
        },
    }


def lerobot_tensors(
    state_dict: Mapping[str, torch.Tensor], cfg: Pi0FastConfig, seed: int
) -> dict[str, torch.Tensor]:
    """Our state dict in LeRobot's names, plus what LeRobot's file has that we never build: SigLIP's
    attention-pooling head (random)."""
    tensors = ckpt.lerobot_names().to_checkpoint(state_dict)
    g = torch.Generator().manual_seed(seed + 1)
    w, mlp = cfg.vision.width, cfg.vision.mlp_dim
    head = {
        "probe": (1, 1, w),
        "attention.in_proj_weight": (3 * w, w),
        "attention.in_proj_bias": (3 * w,),
        "attention.out_proj.weight": (w, w),
        "attention.out_proj.bias": (w,),
        "layernorm.weight": (w,),
        "layernorm.bias": (w,),
        "mlp.fc1.weight": (mlp, w),
        "mlp.fc1.bias": (mlp,),
        "mlp.fc2.weight": (w, mlp),
        "mlp.fc2.bias": (w,),
    }
    for name, shape in head.items():
        tensors[ckpt.VISION + "head." + name] = torch.randn(shape, generator=g) * 0.02
    return tensors


def write_tiny_checkpoint(
    path: Path,
    seed: int = 0,
    *,
    state_dim: int = 5,
    action_dim: int = FAST_DIM,
    max_length: int = 48,
    fast_seed: int = 0,
) -> Path:
    """A tiny random pi0-FAST checkpoint in LeRobot's layout, tokenizers included."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = SIZES["tiny"]
    model = build(cfg)
    init_random_weights(model, seed)
    save_file(lerobot_tensors(model.state_dict(), cfg, seed), str(path / "model.safetensors"))
    config = lerobot_config(cfg, state_dim, action_dim, max_length=max_length)
    (path / "config.json").write_text(json.dumps(config, indent=4))
    stats = tiny_stats(state_dim, action_dim)

    def flat(feature: str) -> dict[str, torch.Tensor]:
        return {f"{feature}.{k}": torch.tensor(v, dtype=torch.float32) for k, v in stats[feature].items()}

    save_file(
        {**flat("observation.state"), **flat("action")},
        str(path / "policy_preprocessor_step_3_normalizer_processor.safetensors"),
    )
    save_file(flat("action"), str(path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    normalizer = {"eps": 1e-8, "norm_map": config["normalization_mapping"]}
    pre = {
        "name": "policy_preprocessor",
        "steps": [
            {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
            {"registry_name": "to_batch_processor", "config": {}},
            {
                "registry_name": "normalizer_processor",
                "config": normalizer,
                "state_file": "policy_preprocessor_step_3_normalizer_processor.safetensors",
            },
            {"registry_name": "pi0_fast_prepare_state_tokenizer_processor_step", "config": {}},
            {
                "registry_name": "tokenizer_processor",
                "config": {"max_length": max_length, "tokenizer_name": "tokenizer"},
                "artifacts": {"tokenizer_name": "tokenizer"},
            },
            {
                "registry_name": "action_tokenizer_processor",
                "config": {"action_tokenizer_name": "action_tokenizer"},
                "artifacts": {"action_tokenizer_name": "action_tokenizer"},
            },
        ],
    }
    post = {
        "name": "policy_postprocessor",
        "steps": [
            {
                "registry_name": "unnormalizer_processor",
                "config": normalizer,
                "state_file": "policy_postprocessor_step_0_unnormalizer_processor.safetensors",
            }
        ],
    }
    (path / "policy_preprocessor.json").write_text(json.dumps(pre, indent=2))
    (path / "policy_postprocessor.json").write_text(json.dumps(post, indent=2))
    write_text_tokenizer(path / ckpt.TEXT_TOKENIZER_DIR)
    write_fast_tokenizer(path / ckpt.ACTION_TOKENIZER_DIR, fast_tokenizer(fast_seed))
    return path
