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

`OpenVLAOFT` is model.py's `Prismatic` (towers, projector, Llama, the batch layout and the prefix
embedding, shared with OpenVLA) plus the two OFT modules. `OpenVLAOFT.forward(OFTBatch)` is the one
step: eagerly the batch's longest prompt sets Lt (`Prismatic.layout`); static.OFTStatic (VLA_COMPILE)
compiles the same function with a fixed Lt per batch bucket; no host syncs, no data-dependent shapes.
Module names are the checkpoint's: `action_head.model.*` and `proprio_projector.fc1/fc2` are upstream's
state-dict names (DDP's `module.` stripped); the towers, projector and llm are OpenVLA's, so
checkpoint.openvla_names maps them. Normalisation (upstream's bounds with 1e-8) is the shared
preprocessing/normalize.py's `bounds` convention; oft_checkpoint.py builds the normalisers.

Shapes: B batch, I images, S image side, N patches per image, W llm width, Wv vision width (Wd + Ws),
P proprio dim, D action dim, Lt prompt tokens after BOS, n = chunk * D, T sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models.openvla.model import OpenVLABatch, OpenVLAConfig, Prismatic, rope_positions

STOP_TOKEN = 2  # Llama-2 "</s>": upstream's STOP_INDEX, appended after the placeholders


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
    def named(cls, name: str, **overrides: object) -> OFTConfig:
        """A size of the table SIZES ("libero", "tiny"), optionally with fields replaced."""
        if name not in SIZES:
            raise ValueError(f"unknown OpenVLA-OFT size {name!r}; known: {', '.join(SIZES)}")
        return replace(SIZES[name], **overrides)  # type: ignore[arg-type]


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


# ---- the network ------------------------------------------------------------------------------


class OFTBatch(NamedTuple):
    """One step's input, rows first: the prompts laid out by `Prismatic.layout` and the proprio."""

    prompts: OpenVLABatch  # pixels (B, I, 6, S, S); bos (B, 1); text, text_valid (B, Lt) left-padded
    proprio: Tensor  # (B, P) float, normalised (P = 0 when the checkpoint has no projector)


class OpenVLAOFT(Prismatic):
    def __init__(self, cfg: OFTConfig) -> None:
        super().__init__(cfg.vla)
        self.cfg = cfg
        self.proprio_projector = ProprioProjector(cfg.proprio_dim, cfg.width) if cfg.proprio_dim else None
        self.action_head = L1RegressionHead(cfg.width, cfg.action_dim, cfg.head_blocks)

    def embed_sequence(self, batch: OFTBatch) -> tuple[Tensor, Tensor]:
        """-> embeddings (B, T, W) and the valid-token mask (B, T) of the layout in the module docstring."""
        cfg = self.cfg
        proprio = None
        if self.proprio_projector is not None:
            proprio = self.proprio_projector(batch.proprio.to(self.llm.embed_tokens.weight.dtype))[:, None]
        prefix, valid = self.embed(
            batch.prompts, proprio
        )  # [BOS | patches | proprio | text]: (B, Tp + Lt, W)
        B, W = prefix.shape[0], prefix.shape[2]
        stop = self.llm.embed_tokens.weight[cfg.stop_token_id].expand(B, 1, W)  # (B, 1, W)
        placeholders = prefix.new_zeros(B, cfg.num_action_tokens, W)  # (B, n, W): zero embeddings
        embeds = torch.cat([prefix, placeholders, stop], dim=1)  # (B, T, W)
        return embeds, torch.cat([valid, valid.new_ones(B, cfg.num_action_tokens + 1)], dim=1)

    def action_hidden(self, batch: OFTBatch) -> Tensor:
        """-> (B, n, W) final-normed hidden states at the n positions upstream reads."""
        embeds, valid = self.embed_sequence(batch)  # (B, T, W), (B, T)
        # The fork's mask: each query (padding ones too: their rows are never empty, never read) sees
        # every valid key.
        hidden = self.llm(embeds, rope_positions(valid), valid[:, None, None, :])  # (B, T, W)
        T, n = hidden.shape[1], self.cfg.num_action_tokens
        return hidden[:, T - 2 - n : T - 2]

    def forward(self, batch: OFTBatch) -> Tensor:
        """The step: OFTBatch -> normalised actions (B, chunk, D) float32."""
        cfg = self.cfg
        hidden = self.action_hidden(batch)  # (B, n, W)
        rows = hidden.reshape(hidden.shape[0], cfg.chunk_size, cfg.action_dim * hidden.shape[2])
        return self.action_head(rows).float()  # (B, chunk, D)
