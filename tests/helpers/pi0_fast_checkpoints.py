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
answer_ids(...)                   an answer in text ids: "Action: " + a chunk's FAST tokens + "|"
teach_answers(dir, cases)         rewrites the LM head's rows of the answers' ids so that greedy
                                  decoding writes each case's answer for its observation

A random network never writes "Action: ... |". `teach_answers` does what the parity recording did
with LeRobot's hidden states (tests/fixtures/pi0_fast/README.md), here with our own network: the
final hidden states at every answer position, teacher-forced through the prefix-LM, and the LM-head
rows of the answers' ids solved by least squares for a logit margin over the other answers' ids.
Hidden states do not depend on the LM head, so greedy decoding then writes exactly those answers
(for those observations; other observations get whatever the random rows give).

`python -m tests.helpers.pi0_fast_checkpoints DIR` writes a tiny checkpoint that answers one demo
observation (DIR/demo/frame.png, state.json, instruction.txt): what `make run` serves by hand.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from torch import Tensor

from tests.helpers.pi0_checkpoints import LEROBOT_OPTIMIZER_FIELDS, LEROBOT_PRETRAINED_FIELDS
from vla_inference.models.base import Observation
from vla_inference.models.common.init import init_random_weights
from vla_inference.models.pi0_fast import checkpoint as ckpt
from vla_inference.models.pi0_fast import fast_tokenizer as fast
from vla_inference.models.pi0_fast.fast_tokenizer import FastTokenizer, fast_to_text_ids
from vla_inference.models.pi0_fast.model import SIZES, Pi0FastBatch, Pi0FastConfig, Pi0FastModel, build
from vla_inference.models.pi0_fast.prompt import ACTION_PREFIX, END_OF_ACTION, TextTokenizer

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
    """config.json as LeRobot's PI0FastConfig saves it (its fields), at test sizes."""
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
        **LEROBOT_PRETRAINED_FIELDS,
        "use_peft": False,
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
        **LEROBOT_OPTIMIZER_FIELDS,
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


# ---- answers the network writes ------------------------------------------------------------------


def answer_ids(
    text: TextTokenizer,
    fast: FastTokenizer,
    chunk: np.ndarray,
    *,
    start: bool = True,
    end: bool = True,
    keep: int | None = None,
) -> list[int]:
    """ "Action: " (`start`) + the chunk's FAST tokens (the first `keep`) + "|" (`end`), as text ids."""
    tokens = fast_to_text_ids(np.asarray(fast.encode(chunk))[:keep], text.vocab_size).tolist()
    prefix = text.encode(ACTION_PREFIX) if start else []
    return [*prefix, *tokens, *([text.token_id(END_OF_ACTION)] if end else [])]


def full_mask(prefix_valid: Tensor, answer: int) -> Tensor:
    """The prefix-LM mask of [prefix | answer] without a cache: (B, 1, T, T) bool, T = P + answer;
    the prefix bidirectional among its valid tokens, the answer causal; every token sees itself."""
    B, P = prefix_valid.shape
    T = P + answer
    valid = torch.cat([prefix_valid, torch.ones(B, answer, dtype=torch.bool)], 1)
    rule = (torch.arange(T) < P)[None, :] | torch.ones(T, T, dtype=torch.bool).tril()
    return ((rule[None] & valid[:, None, :] & valid[:, :, None]) | torch.eye(T, dtype=torch.bool))[:, None]


def teacher_forced(model: Pi0FastModel, batch: Pi0FastBatch, answer: Sequence[int]) -> Tensor:
    """One row's final hidden states (n, W) that predict each of the n answer tokens: the last valid
    prefix token's, then each answer token's but the last; one pass over [prefix | answer]."""
    embs, pad = model.embed_prefix(batch)
    fed = torch.tensor([list(answer[:-1])], dtype=torch.long)
    embs = torch.cat([embs, model.embed_tokens(fed)], 1)
    valid = torch.cat([pad, torch.ones_like(fed, dtype=torch.bool)], 1)
    positions = torch.cumsum(valid.long(), 1) - 1
    hidden = model.vlm(embs, positions, full_mask(pad, fed.shape[1]))[0]
    last = int(torch.nonzero(pad[0]).max())
    return torch.cat([hidden[last : last + 1], hidden[pad.shape[1] :]])


def teach_answers(
    path: Path, cases: Sequence[tuple[Observation, Sequence[int]]], margin: float = 12.0
) -> Path:
    """Rewrite the LM-head rows of every id the cases' answers use, so that greedy decoding of each
    case's observation writes its answer (then the answer's last token decides: "|" stops)."""
    from safetensors.torch import load_file, save_file

    from vla_inference.config import Settings
    from vla_inference.models.pi0_fast.policy import Pi0FastPolicy

    policy = Pi0FastPolicy(Settings(model_path=str(path)))
    policy.load(str(path), "cpu")
    model = policy.loaded.network
    hidden, targets = [], []
    with torch.no_grad():
        for observation, answer in cases:
            batch = policy.collate([policy.prepare(observation)])
            hidden.append(teacher_forced(model, batch, answer).double())
            targets += list(answer)
    h = torch.cat(hidden)  # (n, W)
    ids = sorted(set(targets))
    wanted = torch.full((len(targets), len(ids)), -margin, dtype=torch.float64)
    wanted[torch.arange(len(targets)), torch.tensor([ids.index(t) for t in targets])] = margin
    rows = torch.linalg.lstsq(h, wanted).solution.T  # (len(ids), W)
    tensors = load_file(str(path / "model.safetensors"))
    head = tensors[ckpt.LM_HEAD_KEY].clone()
    head[torch.tensor(ids)] = rows.float()
    tensors[ckpt.LM_HEAD_KEY] = head
    save_file(tensors, str(path / "model.safetensors"))
    return path


DEMO_INSTRUCTION = "pick up the red block"


def write_demo_checkpoint(path: Path) -> Path:
    """A tiny checkpoint that answers one observation with a real chunk: path/demo/frame.png (a
    96 x 128 frame), state.json (5 values), instruction.txt. Greedy decoding of that observation
    writes "Action: " + the FAST tokens of a smooth 10 x 3 chunk + "|"; other observations get
    whatever the random network writes (usually no action: a clear error)."""
    from PIL import Image

    write_tiny_checkpoint(path, seed=11)
    demo = path / "demo"
    demo.mkdir(exist_ok=True)
    rng = np.random.default_rng(11)
    frame = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(frame).save(demo / "frame.png")
    state = [0.3, -0.1, 0.5, 0.2, 1.0]
    (demo / "state.json").write_text(json.dumps(state))
    (demo / "instruction.txt").write_text(DEMO_INSTRUCTION + "\n")
    text = TextTokenizer.load(path / ckpt.TEXT_TOKENIZER_DIR / "tokenizer.json")
    tokenizer = fast.FastTokenizer.load(path / ckpt.ACTION_TOKENIZER_DIR)
    chunk = synthetic_chunks(1, seed=5)[0]
    observation = Observation({"base": frame}, np.asarray(state, np.float32), DEMO_INSTRUCTION)
    return teach_answers(path, [(observation, answer_ids(text, tokenizer, chunk))])


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "pi0-fast-tiny")
    write_demo_checkpoint(target)
    print(f"wrote {target}: serve it with VLA_MODEL_PATH={target} make run; ask it with")
    print(
        f"  .venv/bin/vla-inference predict --image {target}/demo/frame.png "
        f"--joints @{target}/demo/state.json --instruction '{DEMO_INSTRUCTION}'"
    )
