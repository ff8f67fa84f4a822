"""OpenVLA-OFT: the OpenVLA network decoding a whole action chunk in one bidirectional forward pass.

What differs from OpenVLA (model.py), all of it here:

    pixels (B, I, 6, S, S), I images (LIBERO: third-person, wrist), each [DINOv2-norm | SigLIP-norm] RGB
      -> both towers on every image -> projector            (B, I*N, W)   images in input order
    proprio (B, P) normalised -> ProprioProjector           (B, 1, W)     one token after the patches
    sequence, one row per robot (T = Tp + Lt + n + 1):
      [BOS | patches | proprio | left padding | prompt after BOS | n zero embeddings | stop (id 2)]
      Tp = 1 + I*N + 1 prefix columns, Lt text columns, n = chunk * D action placeholders
    -> Llama with the OFT fork's mask: every query sees every non-padding key (bidirectional), RoPE positions
       count valid tokens, so a row's answer does not depend on the padding (= its single-row answer)
    -> final-normed hidden states at columns [T - 2 - n, T - 2): the position *before* each placeholder, as
       upstream slices them (the last prompt token .. the second-to-last placeholder; training does the same)
    -> (B, chunk, D*W) -> L1 regression head (MLP-ResNet) -> normalised actions (B, chunk, D)

The placeholders' input embeddings are zero (upstream multiplies them by the action mask); the stop token
keeps its real embedding (it is outside the mask). lm_head is never built: OFT reads hidden states only.
FiLM (language-conditioned vision, ALOHA) is not implemented; oft_checkpoint.py refuses such checkpoints.

`OpenVLAOFT.forward(OFTInputs)` is the one step: eager calls use the batch's longest prompt as Lt, a
static-shape runner passes a fixed Lt through `collate_prompts(..., text_len=...)`; same function, no host
syncs, no data-dependent shapes. Module names are the checkpoint's: `action_head.model.*` and
`proprio_projector.fc1/fc2` are upstream's state-dict names (DDP's `module.` stripped); the towers,
projector and llm are named as in OpenVLA so that checkpoint.openvla_names maps them.

Shapes: B batch, I images, S image side, N patches per image, W llm width, Wv vision width (Wd + Ws),
P proprio dim, D action dim, Lt prompt tokens after BOS, n = chunk * D, T sequence length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models.common.transformer import Decoder
from vla_inference.models.common.vit import VisionTower
from vla_inference.models.openvla.model import OpenVLAConfig, PrismaticProjector

STOP_TOKEN = 2  # Llama-2 "</s>": upstream's STOP_INDEX, appended after the placeholders
RANGE_EPS = 1e-8  # upstream adds it to (high - low) when normalising proprio and un-normalising actions


@dataclass(frozen=True)
class OFTConfig:
    vla: OpenVLAConfig = field(default_factory=lambda: OpenVLAConfig.named("7b"))
    chunk_size: int = 8  # upstream NUM_ACTIONS_CHUNK
    action_dim: int = 7  # ACTION_DIM
    proprio_dim: int = 8  # PROPRIO_DIM; 0 = no proprio token
    num_images: int = 2  # num_images_in_input
    head_blocks: int = 2  # MLP-ResNet blocks of the L1 head
    stop_token_id: int = STOP_TOKEN

    @property
    def width(self) -> int:
        """The LLM width: the head's hidden size and the projectors' output."""
        return self.vla.llm.width

    @property
    def num_action_tokens(self) -> int:
        return self.chunk_size * self.action_dim

    @property
    def prefix_len(self) -> int:
        """BOS + every image's patches + the proprio token."""
        return 1 + self.num_images * self.vla.num_patches + int(self.proprio_dim > 0)

    def sequence_len(self, text_len: int) -> int:
        """Columns of a sequence whose prompt after BOS is `text_len` tokens."""
        return self.prefix_len + text_len + self.num_action_tokens + 1

    @classmethod
    def named(cls, name: str) -> OFTConfig:
        try:
            return SIZES[name]
        except KeyError:
            raise ValueError(f"unknown OpenVLA-OFT size {name!r}; known: {', '.join(SIZES)}") from None


SIZES: dict[str, OFTConfig] = {
    # moojink/openvla-7b-oft-finetuned-libero-*: OpenVLA 7B, 8 x 7 chunks, proprio 8, third-person + wrist.
    "libero": OFTConfig(),
    # Test size: the tiny OpenVLA with LIBERO's chunk, dims and images (what upstream's constants give).
    "tiny": OFTConfig(vla=OpenVLAConfig.named("tiny")),
}


# ---- the two modules OFT adds (upstream's structure and names) ----------------------------------


class MLPResNetBlock(nn.Module):
    """x + ReLU(Linear(LayerNorm(x)))  (names: ffn.0 LayerNorm, ffn.1 Linear)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LayerNorm -> Linear -> ReLU -> blocks -> LayerNorm -> Linear."""

    def __init__(self, blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.fc1(self.layer_norm1(x)))
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


class L1RegressionHead(nn.Module):
    """(B, chunk, D*W) -> (B, chunk, D): one timestep's D hidden states side by side (upstream's reshape)."""

    def __init__(self, width: int, action_dim: int, blocks: int) -> None:
        super().__init__()
        self.model = MLPResNet(blocks, width * action_dim, width, action_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class ProprioProjector(nn.Module):
    """(B, P) -> (B, W): Linear, exact GELU, Linear."""

    def __init__(self, proprio_dim: int, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# ---- inputs -----------------------------------------------------------------------------------


class OFTInputs(NamedTuple):
    pixels: Tensor  # (B, I, 6, S, S) float: per image [DINOv2-normalised | SigLIP-normalised] RGB
    proprio: Tensor  # (B, P) float, normalised (P = 0 when the checkpoint has no projector)
    bos: Tensor  # (B, 1) int64
    text: Tensor  # (B, Lt) int64: the prompt after BOS (29871 included), left-padded
    text_valid: Tensor  # (B, Lt) bool


def collate_prompts(
    prompts: Sequence[Tensor], pad_id: int, text_len: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """B prompts (L_i,) int64 starting with BOS -> bos (B, 1), text (B, Lt), text_valid (B, Lt).

    The text after BOS is left-padded to `text_len` (default: the longest), so the placeholders sit at
    the same columns in every row. Host-side: runs before the forward."""
    longest = max(int(p.shape[0]) - 1 for p in prompts)
    width = longest if text_len is None else text_len
    if longest > width:
        raise ValueError(f"a prompt of {longest} tokens after BOS exceeds the {width} columns")
    text = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        n = int(prompt.shape[0]) - 1
        if n:
            text[row, width - n :] = prompt[1:]
            valid[row, width - n :] = True
    bos = torch.stack([p[:1] for p in prompts]).long()
    return bos, text, valid


# ---- the network ------------------------------------------------------------------------------


class OpenVLAOFT(nn.Module):
    def __init__(self, cfg: OFTConfig) -> None:
        super().__init__()
        vla = cfg.vla
        if vla.dino.num_patches != vla.siglip.num_patches:
            raise ValueError("the two towers must yield the same number of patches")
        self.cfg = cfg
        self.dino = VisionTower(vla.dino)
        self.siglip = VisionTower(vla.siglip)
        self.projector = PrismaticProjector(vla.vision_dim, vla.llm.width)
        self.llm = Decoder(vla.llm, vocab_size=vla.vocab_size)
        self.proprio_projector = ProprioProjector(cfg.proprio_dim, cfg.width) if cfg.proprio_dim else None
        self.action_head = L1RegressionHead(cfg.width, cfg.action_dim, cfg.head_blocks)

    def image_tokens(self, pixels: Tensor) -> Tensor:
        """(B, I, 6, S, S) -> (B, I*N, W): both towers on every image (one tower call for all of them),
        patches concatenated per patch, images concatenated in input order, then the projector."""
        B, I = pixels.shape[:2]
        dino, siglip = pixels.flatten(0, 1).split([3, 3], dim=1)  # (B*I, 3, S, S) each
        features = torch.cat([self.dino(dino), self.siglip(siglip)], dim=2)  # (B*I, N, Wv)
        tokens = self.projector(features)  # (B*I, N, W)
        return tokens.reshape(B, I * tokens.shape[1], tokens.shape[2])

    def embed(self, inputs: OFTInputs) -> tuple[Tensor, Tensor]:
        """-> embeddings (B, T, W) and the valid-token mask (B, T) of the layout in the module docstring."""
        cfg = self.cfg
        embed = self.llm.embed_tokens
        dtype = embed.weight.dtype
        B = inputs.bos.shape[0]
        parts = [embed(inputs.bos), self.image_tokens(inputs.pixels).to(dtype)]  # (B, 1, W), (B, I*N, W)
        if self.proprio_projector is not None:
            proprio = self.proprio_projector(inputs.proprio.to(dtype))  # (B, W)
            parts.append(proprio[:, None])  # (B, 1, W)
        stop = embed.weight[cfg.stop_token_id].expand(B, 1, -1)  # (B, 1, W)
        parts += [
            embed(inputs.text),  # (B, Lt, W)
            stop.new_zeros(B, cfg.num_action_tokens, stop.shape[2]),  # (B, n, W) placeholders: zero
            stop,
        ]
        embeds = torch.cat(parts, dim=1)  # (B, T, W)
        prefix = inputs.text_valid.new_ones(B, cfg.prefix_len)
        suffix = inputs.text_valid.new_ones(B, cfg.num_action_tokens + 1)
        valid = torch.cat([prefix, inputs.text_valid, suffix], dim=1)  # (B, T)
        return embeds, valid

    def action_hidden(self, inputs: OFTInputs) -> Tensor:
        """-> (B, n, W) final-normed hidden states at the n positions upstream reads."""
        embeds, valid = self.embed(inputs)  # (B, T, W), (B, T)
        positions = (torch.cumsum(valid.long(), dim=1) - 1).clamp(min=0)  # (B, T): RoPE counts valid tokens
        # The fork's mask: each query (padding ones too: their rows are never empty, never read) sees
        # every valid key.
        mask = valid[:, None, None, :]  # (B, 1, 1, T)
        hidden = self.llm(embeds, positions, mask)  # (B, T, W)
        T, n = hidden.shape[1], self.cfg.num_action_tokens
        return hidden[:, T - 2 - n : T - 2]

    def forward(self, inputs: OFTInputs) -> Tensor:
        """The step: OFTInputs -> normalised actions (B, chunk, D) float32."""
        cfg = self.cfg
        hidden = self.action_hidden(inputs)  # (B, n, W)
        rows = hidden.reshape(hidden.shape[0], cfg.chunk_size, cfg.action_dim * hidden.shape[2])
        return self.action_head(rows).float()  # (B, chunk, D)


# ---- normalisation (upstream's BOUNDS / BOUNDS_Q99 formulas) -----------------------------------


@dataclass(frozen=True)
class Bounds:
    """One quantity's bounds: q01/q99 (BOUNDS_Q99) or min/max (BOUNDS), and the mask (True = normalise)."""

    low: np.ndarray  # (K,) float64
    high: np.ndarray  # (K,)
    mask: np.ndarray  # (K,) bool

    @property
    def dim(self) -> int:
        return int(self.low.shape[0])


def normalize_proprio(proprio: np.ndarray, bounds: Bounds) -> np.ndarray:
    """Robot units -> [-1, 1]: 2 (x - low) / (high - low + 1e-8) - 1 where the mask holds, raw elsewhere,
    then every dimension clipped to [-1, 1] (upstream's inference normalize_proprio)."""
    scaled = 2.0 * (proprio - bounds.low) / (bounds.high - bounds.low + RANGE_EPS) - 1.0
    return np.clip(np.where(bounds.mask, scaled, proprio), -1.0, 1.0)


def unnormalize_actions(actions: np.ndarray, bounds: Bounds) -> np.ndarray:
    """(..., D) head output -> robot units: 0.5 (a + 1) (high - low + 1e-8) + low where the mask holds."""
    return np.where(
        bounds.mask, 0.5 * (actions + 1.0) * (bounds.high - bounds.low + RANGE_EPS) + bounds.low, actions
    )
