"""NVIDIA GR00T N1.5: Eagle 2.5 backbone + flow-matching DiT action head (action_head.py).

Written from the public architecture (NVIDIA/Isaac-GR00T, N1.5 release), not copied, on the
shared pieces of models/common. Runs on CPU and CUDA with F.scaled_dot_product_attention
(upstream asserts flash-attention 2).

    images (N_img, 3, 224, 224) --SigLIP tower--> (N_img, 256, 1152) --mlp1--> (N_img, 256, 2048)
    prompt ids (B, L) with 256 <IMG_CONTEXT> ids per image --embed, scatter image rows-->
    Qwen3 (first `select_layer` layers, final RMSNorm) -> (B, L, 2048) = backbone features
    action head: vlln + VL adapter -> DiT flow matching, 4 Euler steps -> actions (B, 16, 32)

Names are ours; checkpoint.py maps them to upstream's (backbone.eagle_model..., action_head...).

Deliberate differences from upstream (documented, both only matter for padded batches):
  * the backbone attention mask is honoured by the VL adapter and the DiT cross-attention
    (upstream ignores it there; a single unpadded sample is identical), so a padded batch
    equals its samples run one by one;
  * prompts are right-padded (the LM is causal, so real tokens never see padding).

Sampling is one prefix (`prefix`: backbone, VL adapter, the DiT's cross-attention keys/values
into a cache, the state features) and one Euler step (`euler_step`): `sample` runs them eagerly, static.py
(VLA_COMPILE) compiles the same two functions with static shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vla_inference.models.common.transformer import Decoder, DecoderConfig
from vla_inference.models.common.vit import VisionTower, ViTConfig
from vla_inference.models.groot.action_head import (
    ActionHead,
    ActionHeadConfig,
    DiTConfig,
    GrootNetwork,
    VLAdapterConfig,
)

STATIC_INSTRUCTION_TOKENS = 64  # VLA_COMPILE: instruction tokens the compiled prompt length allows

# The Qwen3-1.7B language model of N1.5's Eagle 2.5 backbone (q/k RMSNorm, SiLU).
QWEN3_1_7B = DecoderConfig(
    width=2048,
    depth=28,
    mlp_dim=6144,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=1_000_000.0,
    norm_eps=1e-6,
    qk_norm=True,
)
# N1.5's vision tower: the SiglipVisionModel layout (SigLIP2-400M weights in it), 224 px.
SIGLIP_400M = ViTConfig(width=1152, depth=27, num_heads=16, mlp_dim=4304, patch_size=14, image_size=224)


@dataclass(frozen=True)
class EagleConfig:
    """The Eagle 2.5 backbone: SigLIP tower -> mlp1 connector -> Qwen3 cut at `select_layer`."""

    vision: ViTConfig = SIGLIP_400M
    llm: DecoderConfig = QWEN3_1_7B  # the whole LM's config; only `select_layer` layers are built
    select_layer: int = 12
    vocab_size: int = 151680
    image_token_id: int = 151669  # <IMG_CONTEXT>
    use_pixel_shuffle: bool = False  # N1.5: "1mlp_nops" = one Linear, no pixel shuffle
    downsample_ratio: float = 0.5
    mlp_connector_layers: int = 1
    project_to_dim: int | None = None  # backbone.eagle_linear; None in N1.5

    @property
    def num_image_tokens(self) -> int:
        side = self.vision.image_size // self.vision.patch_size
        if self.use_pixel_shuffle:
            return int(side * side * self.downsample_ratio**2)
        return side * side

    @property
    def width(self) -> int:
        """The backbone features' width (what the action head reads)."""
        return self.project_to_dim or self.llm.width


@dataclass(frozen=True)
class GrootConfig:
    """GR00T N1.5: the backbone and the action head, each from its checkpoint config section."""

    backbone: EagleConfig = field(default_factory=EagleConfig)
    head: ActionHeadConfig = field(default_factory=ActionHeadConfig)

    @classmethod
    def named(cls, name: str, **overrides: object) -> GrootConfig:
        """A size of SIZES ("n1.5-3b", "tiny"); `overrides` replace action-head fields (state and
        action widths, horizon, ...)."""
        if name not in SIZES:
            raise ValueError(f"unknown GR00T size {name!r}; known: {', '.join(SIZES)}")
        cfg = SIZES[name]
        return replace(cfg, head=replace(cfg.head, **overrides)) if overrides else cfg  # type: ignore[arg-type]

    # The sizes the policy reads most often.
    @property
    def image_size(self) -> int:
        return self.backbone.vision.image_size

    @property
    def action_dim(self) -> int:
        return self.head.action_dim

    @property
    def action_horizon(self) -> int:
        return self.head.action_horizon

    @property
    def max_state_dim(self) -> int:
        return self.head.max_state_dim


SIZES: dict[str, GrootConfig] = {
    "n1.5-3b": GrootConfig(),
    # Tiny: every code path of the real model, seconds on a CPU.
    "tiny": GrootConfig(
        backbone=EagleConfig(
            vision=ViTConfig(
                width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, image_size=32
            ),  # 16 tokens
            llm=replace(QWEN3_1_7B, width=64, depth=4, mlp_dim=96, num_heads=4, num_kv_heads=2, head_dim=16),
            select_layer=2,
            vocab_size=96,
            image_token_id=95,
        ),
        head=ActionHeadConfig(
            backbone_embedding_dim=64,
            input_embedding_dim=48,
            hidden_size=40,
            max_state_dim=16,
            action_dim=8,
            action_horizon=16,
            num_target_vision_tokens=4,
            max_seq_len=64,
            dit=DiTConfig(heads=4, head_dim=12, layers=4, output_dim=40, cross_attention_dim=64),
            vl_adapter=VLAdapterConfig(heads=4, head_dim=16, layers=2),
        ),
    ),
}


class GrootBatch(NamedTuple):
    """A batch's inputs to the sampler (policy.collate), every tensor with the rows first."""

    pixels: Tensor  # (B, V, 3, S, S) normalised; a row with fewer views has zero images after its own
    input_ids: Tensor  # (B, L) right-padded, V_b * T_img <IMG_CONTEXT> ids in row b
    attention_mask: Tensor  # (B, L) bool
    state: Tensor  # (B, 1, max_state_dim) normalised + zero-padded
    embodiment_ids: Tensor  # (B,) long: the projector index of the embodiment-specific layers


class EagleBackbone(nn.Module):
    """SigLIP tower -> mlp1 connector -> image rows scattered into the prompt -> truncated Qwen3."""

    def __init__(self, cfg: EagleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        width = cfg.llm.width
        vit_out = cfg.vision.width * (int(1 / cfg.downsample_ratio) ** 2 if cfg.use_pixel_shuffle else 1)
        if cfg.mlp_connector_layers == 2:
            self.mlp1 = nn.Sequential(
                nn.LayerNorm(vit_out), nn.Linear(vit_out, width), nn.GELU(), nn.Linear(width, width)
            )
        elif cfg.mlp_connector_layers == 1:
            self.mlp1 = nn.Sequential(nn.Linear(vit_out, width))
        else:
            raise ValueError(f"mlp_connector_layers must be 1 or 2, got {cfg.mlp_connector_layers}")
        # Upstream keeps hidden_states[select_layer] of the LM cut to select_layer layers; HF applies
        # the final norm to the last hidden state, hence the Decoder's norm.
        self.llm = Decoder(cfg.llm, vocab_size=cfg.vocab_size, layers=cfg.select_layer)
        self.eagle_linear = nn.Linear(width, cfg.project_to_dim) if cfg.project_to_dim is not None else None

    def pixel_shuffle(self, x: Tensor) -> Tensor:  # (N, W, H, C) -> (N, W*r, H*r, C/r^2)
        r = self.cfg.downsample_ratio
        n, w, h, c = x.shape
        x = x.reshape(n, w, int(h * r), int(c / r)).permute(0, 2, 1, 3)
        x = x.reshape(n, int(h * r), int(w * r), int(c / (r * r)))
        return x.permute(0, 2, 1, 3).contiguous()

    def image_features(self, pixels: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, T_img, D_llm)
        x = self.vision(pixels)
        if self.cfg.use_pixel_shuffle:
            side = int(x.shape[1] ** 0.5)
            x = self.pixel_shuffle(x.reshape(x.shape[0], side, side, -1))
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.mlp1(x)

    def forward(
        self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor, check: bool = True
    ) -> Tensor:
        """pixels (B, V, 3, S, S), input_ids / attention_mask (B, L) -> features (B, L, D).

        The k-th <IMG_CONTEXT> id of row b takes the k-th image token of row b's images (its views
        in order). `check` (a host sync) refuses a row with more image ids than its V images have
        tokens; the static path skips it (the policy builds prompts and images together)."""
        B, V = pixels.shape[:2]
        embeds = self.llm.embed_tokens(input_ids)  # (B, L, D)
        vit = self.image_features(pixels.flatten(0, 1))  # (B * V, T_img, D)
        per_row = V * vit.shape[1]
        selected = input_ids == self.cfg.image_token_id  # (B, L)
        if check and int(selected.sum(dim=1).max()) > per_row:
            raise ValueError(
                f"a prompt has {int(selected.sum(dim=1).max())} image tokens, its {V} images have {per_row}"
            )
        # masked_scatter per row written as a gather: static shapes, no data-dependent size
        within = (torch.cumsum(selected, dim=1) - 1).clamp(min=0)  # (B, L) index among the row's tokens
        index = within + torch.arange(B, device=within.device)[:, None] * per_row
        rows = vit.to(embeds.dtype).flatten(0, 1)[index]  # (B, L, D)
        embeds = torch.where(selected[..., None], rows, embeds)
        L = embeds.shape[1]
        positions = torch.arange(L, device=embeds.device)[None].expand(B, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=embeds.device).tril()
        mask = causal[None, None] & attention_mask[:, None, None, :]  # (B, 1, L, L)
        hidden = self.llm(embeds, positions, mask)
        return hidden if self.eagle_linear is None else self.eagle_linear(hidden)


class GR00TN15(GrootNetwork):
    """The whole policy network: the Eagle backbone and the action head, sampled as the head's
    GrootNetwork (prefix, euler_step, sample)."""

    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = EagleBackbone(cfg.backbone)
        self.action_head = ActionHead(cfg.head)

    def features(self, batch: GrootBatch, check: bool) -> Tensor:
        return self.backbone(batch.pixels.to(self.dtype), batch.input_ids, batch.attention_mask, check)
