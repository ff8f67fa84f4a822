"""Tiny OpenVLA checkpoints in the published HF layout, for tests (written in well under a second).

`write_tiny_openvla_checkpoint` writes what openvla/openvla-7b ships, at test size:

  config.json                   published keys (timm_model_ids, image_sizes, image_resize_strategy,
                                text_config, pad_token_id, pad_to_multiple_of, n_action_bins,
                                norm_stats) plus `vla_inference_towers`, the tiny towers' sizes
  model-0000N-of-00002.safetensors + model.safetensors.index.json   (or one model.safetensors)
  tokenizer.model               a Llama-style SentencePiece BPE model (byte fallback, BOS = 1),
                                trained deterministically here with a vocabulary of 400
  preprocessor_config.json      means/stds/interpolations as published

De-tokenisation stays real: the language model has the real 32000 + 64 vocabulary
(text_config.vocab_size = 32064), and the policy counts action bins back from
vocab_size - pad_to_multiple_of = 32000, never from the tokenizer. The tokenizer only encodes
the prompt (its ids < 400 index the same embedding table); 29871 is appended as in the
reference. The lm_head rows outside the 256 action tokens are zero, so the greedy token is
always an action token and different images give different actions.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from tests.helpers.shards import write_two_shards
from vla_inference.models.common import vit
from vla_inference.models.openvla.checkpoint import openvla_names
from vla_inference.models.openvla.model import OpenVLA, OpenVLAConfig

TINY = OpenVLAConfig.named("tiny")
TOKENIZER_VOCAB = 400

_WORDS = (
    "pick place put the a red blue green block cup plate on in to of move open close drawer robot what "
    "action should take out spoon carrot pot sink towel left right up down"
)


def tiny_tokenizer_model() -> bytes:
    """A Llama-style SentencePiece model (BPE, byte fallback, unk 0 / bos 1 / eos 2), deterministic."""
    import sentencepiece

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(_WORDS.split()) for _ in range(8)) for _ in range(500)]
    corpus += ["In: What action should the robot take to pick up the cup?", "Out:"]
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=out,
        vocab_size=TOKENIZER_VOCAB,
        model_type="bpe",
        byte_fallback=True,
        num_threads=1,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        minloglevel=2,
    )
    return out.getvalue()


def quantity_stats(rng: np.random.Generator, dim: int, spread: float, mask: bool) -> dict[str, Any]:
    """One quantity's statistics as the RLDS pipeline writes them: q01 < 0 < q99, mean/std, min/max
    `spread` times wider; with `mask`, the gripper (last) dimension False."""
    q01 = -rng.uniform(0.1, 2.0, dim)
    q99 = rng.uniform(0.1, 2.0, dim)
    out: dict[str, Any] = {
        "mean": ((q01 + q99) / 2).tolist(),
        "std": ((q99 - q01) / 4).tolist(),
        "max": (q99 * spread).tolist(),
        "min": (q01 * spread).tolist(),
        "q01": q01.tolist(),
        "q99": q99.tolist(),
    }
    if mask:
        out["mask"] = [True] * (dim - 1) + [False]
    return out


def tiny_norm_stats(datasets: tuple[str, ...], seed: int = 0, dim: int = 7) -> dict[str, Any]:
    """Per dataset: q01 < 0 < q99, mean/std/min/max, mask with the gripper (last) dimension False."""
    rng = np.random.default_rng(seed + 1000)
    stats: dict[str, Any] = {}
    for name in datasets:
        stats[name] = {
            "action": quantity_stats(rng, dim, 1.5, mask=True),
            "proprio": {k: [0.0] * dim for k in ("mean", "std", "max", "min", "q01", "q99")},
            "num_transitions": 1000,
            "num_trajectories": 10,
        }
    return stats


def init_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights for tests: matrices ~ N(0, 1/fan_in), norms ~1, biases small, layer scale 0.5..1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            noise = torch.randn(param.shape, generator=generator)
            if leaf in ("ls1", "ls2"):
                param.copy_(0.5 + 0.5 * torch.rand(param.shape, generator=generator))
            elif leaf == "weight" and param.ndim == 1:  # LayerNorm / RMSNorm
                param.copy_(1.0 + 0.1 * noise)
            elif leaf == "bias" or param.ndim not in (2, 4) or leaf in ("pos_embed", "reg_tokens"):
                param.copy_(0.02 * noise)
            else:  # Linear (out, in), Conv2d (out, C, k, k), Embedding (V, D)
                param.copy_(noise / math.sqrt(param[0].numel()))


def tiny_model(seed: int = 0, cfg: OpenVLAConfig = TINY) -> OpenVLA:
    """A random OpenVLA whose greedy token is always an action token (lm_head zero elsewhere)."""
    model = OpenVLA(cfg)
    init_weights(model, seed)
    with torch.no_grad():
        head = model.lm_head.weight  # (32064, D)
        first_action = cfg.action_vocab_size - (cfg.n_action_bins - 1)  # 31745: bins 254..0
        keep = torch.zeros(head.shape[0], dtype=torch.bool)
        keep[first_action : cfg.action_vocab_size] = True
        head[~keep] = 0.0
        head[keep] *= 4.0
    return model


def _never_run(prefix: str, tower: vit.ViTConfig, seed: int, attn_pool: bool) -> dict[str, torch.Tensor]:
    """What a published tower also holds: its last block and final norm (+ SigLIP's MAP head)."""
    full = vit.VisionTower(replace(tower, output=vit.FINAL))
    init_weights(full, seed)
    out = {}
    for name, tensor in full.state_dict().items():
        if name.startswith((f"blocks.{tower.depth - 1}.", "norm.")):
            for source in vit.timm_name(name, tuple(tensor.shape), "scale_factor"):
                out[prefix + source.key] = tensor.reshape(source.shape or tensor.shape).clone()
    if attn_pool:
        w, m = tower.width, tower.mlp_dim
        shapes = {"latent": (1, 1, w), "q.weight": (w, w), "q.bias": (w,), "kv.weight": (2 * w, w)}
        shapes |= {"kv.bias": (2 * w,), "proj.weight": (w, w), "proj.bias": (w,), "norm.weight": (w,)}
        shapes |= {
            "norm.bias": (w,),
            "mlp.fc1.weight": (m, w),
            "mlp.fc1.bias": (m,),
            "mlp.fc2.weight": (w, m),
        }
        shapes |= {"mlp.fc2.bias": (w,)}
        g = torch.Generator().manual_seed(seed)
        out |= {f"{prefix}attn_pool.{k}": 0.02 * torch.randn(v, generator=g) for k, v in shapes.items()}
    return out


def tiny_state_dict(seed: int = 0, cfg: OpenVLAConfig = TINY) -> dict[str, torch.Tensor]:
    """Every tensor of a tiny checkpoint in the published names, the never-run ones included."""
    tensors = openvla_names(cfg).to_checkpoint(tiny_model(seed, cfg).state_dict())
    tensors |= _never_run("vision_backbone.featurizer.", cfg.dino, seed + 1, attn_pool=False)
    tensors |= _never_run("vision_backbone.fused_featurizer.", cfg.siglip, seed + 2, attn_pool=True)
    return tensors


def tiny_config_json(cfg: OpenVLAConfig, datasets: tuple[str, ...], seed: int) -> dict[str, Any]:
    from dataclasses import asdict

    return {
        "architectures": ["OpenVLAForActionPrediction"],
        "model_type": "openvla",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "llama2-7b-pure",
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "use_fused_vision_backbone": True,
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None],
        "image_sizes": [cfg.dino.image_size, cfg.siglip.image_size],
        "image_resize_strategy": "resize-naive",
        "llm_max_length": 2048,
        "pad_token_id": cfg.pad_token_id,
        "pad_to_multiple_of": cfg.pad_to_multiple_of,
        "n_action_bins": cfg.n_action_bins,
        "output_projector_states": False,
        "torch_dtype": "float32",
        "transformers_version": "4.40.1",
        "text_config": {
            "model_type": "llama",
            "pad_token_id": cfg.pad_token_id,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.llm.width,
            "intermediate_size": cfg.llm.mlp_dim,
            "num_hidden_layers": cfg.llm.depth,
            "num_attention_heads": cfg.llm.num_heads,
            "num_key_value_heads": cfg.llm.num_kv_heads,
            "max_position_embeddings": cfg.max_seq_len,
        },
        "vla_inference_towers": [asdict(cfg.dino), asdict(cfg.siglip)],
        "norm_stats": tiny_norm_stats(datasets, seed),
    }


def write_tiny_openvla_checkpoint(
    path: Path, seed: int = 0, datasets: tuple[str, ...] = ("bridge_orig",), sharded: bool = True
) -> Path:
    """Write a tiny random OpenVLA checkpoint directory at `path`; return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = TINY
    (path / "config.json").write_text(json.dumps(tiny_config_json(cfg, tuple(datasets), seed), indent=2))
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "PrismaticImageProcessor",
                "image_resize_strategy": "resize-naive",
                "input_sizes": [[3, cfg.dino.image_size, cfg.dino.image_size]] * 2,
                "interpolations": ["bicubic", "bicubic"],
                "means": [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
                "stds": [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
                "use_fused_vision_backbone": True,
            },
            indent=2,
        )
    )
    (path / "tokenizer.model").write_bytes(tiny_tokenizer_model())
    tensors = tiny_state_dict(seed, cfg)
    if not sharded:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    # Like the published split: vision + projector + first LM tensors in shard 1, the rest in shard 2.
    write_two_shards(path, tensors, order=list(tensors))
    return path
