"""NVIDIA GR00T N1.7: the Cosmos-Reason2 backbone (cosmos.py) + GR00T's flow-matching action head
(action_head.py, shared with N1.5), sampled as action_head.GrootNetwork (prefix, euler_step, sample).

What differs from N1.5 (model.py), in this file and in the head's config (action_head.py's table):

    backbone        Qwen3-VL (cosmos.py) instead of Eagle 2.5; features without the final norm;
                    M-RoPE positions (3 per token) travel with the batch
    image/text      the DiT's cross-attention blocks alternate between the prompt's text and image
                    tokens (dit.attend_text_every_n_blocks = 2, AlternateVLDiT)
    tokens          [state | actions]: no future tokens (num_target_vision_tokens = 0)
    state           state_history_length states enter the state encoder as one token
    VL adapter      present when config.json has vl_self_attention_cfg.num_layers > 0 (the published
                    checkpoints: 4 layers); N1.5 ties it to use_vlln
    sizes           horizon 40, max state / action dims 132, DiT 32 layers (read from config.json)

Legend: B batch, V images per row (cameras x frames), S image side, L prompt tokens, Dv backbone
width, D DiT width (heads x head_dim), H horizon, A max action dim, T_s state history.

    pixels (B, V, 3, S, S), ids (B, L), positions (B, 3, L) --CosmosBackbone--> features (B, L, Dv)
    features --vlln, VL adapter (padding masked)--> vl --each cross block's to_k / to_v, once-->
        cross_kv (C, 2, B, h, L, d)
    state (B, T_s, S) --one token--> state_encoder[emb] (B, 1, D)
    x (B, H, A) at step k: tokens = [state | action_encoder[emb](x, bucket) + pos[:H]]
    DiT (text / image cross blocks alternating) -> v = action_decoder[emb](out)[:, -H:]
    x += v / steps   (tau = k / steps, bucket = int(tau 1000))

Deliberate difference from upstream (only for padded batches): the VL adapter masks padding keys
(upstream attends to them), so a padded batch equals its samples run one by one; a single unpadded
sample is identical.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

from torch import Tensor

from vla_inference.models.groot.action_head import (
    ActionHead,
    ActionHeadConfig,
    DiTConfig,
    GrootNetwork,
    VLAdapterConfig,
)
from vla_inference.models.groot.cosmos import (
    COSMOS_REASON2_2B,
    CosmosBackbone,
    CosmosConfig,
    CosmosVisionConfig,
)

# nvidia/GR00T-N1.7-3B's head (config.json; a third-party check of the published tensors agrees).
N17_HEAD = ActionHeadConfig(
    backbone_embedding_dim=2048,
    input_embedding_dim=1536,
    hidden_size=1024,
    max_state_dim=132,
    action_dim=132,
    action_horizon=40,
    num_target_vision_tokens=0,
    max_seq_len=1024,
    max_num_embodiments=32,
    dit=DiTConfig(heads=32, head_dim=48, layers=32, output_dim=1024, attend_text_every_n_blocks=2),
    vl_adapter=VLAdapterConfig(heads=32, head_dim=64, layers=4),
)


@dataclass(frozen=True)
class Groot17Config:
    """GR00T N1.7: the Cosmos backbone, the action head, the processor's output image side."""

    backbone: CosmosConfig
    head: ActionHeadConfig
    image_size: int = 256  # the image processor's output side (processor_config.json)

    @classmethod
    def named(cls, name: str, **overrides: object) -> Groot17Config:
        """A size of SIZES ("n1.7-3b", "tiny"); `overrides` replace action-head fields."""
        if name not in SIZES:
            raise ValueError(f"unknown GR00T N1.7 size {name!r}; known: {', '.join(SIZES)}")
        cfg = SIZES[name]
        return replace(cfg, head=replace(cfg.head, **overrides)) if overrides else cfg  # type: ignore[arg-type]

    @property
    def tokens_per_image(self) -> int:
        return self.backbone.vision.tokens_per_image(self.image_size, self.image_size)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of merged tokens per image."""
        side = self.image_size // (self.backbone.vision.patch_size * self.backbone.vision.merge)
        return side, side


SIZES: dict[str, Groot17Config] = {
    # nvidia/GR00T-N1.7-3B: Cosmos-Reason2-2B cut at layer 16, DiT 32 layers, VL adapter 4 layers.
    "n1.7-3b": Groot17Config(backbone=COSMOS_REASON2_2B, head=N17_HEAD),
    # Tiny: every code path of the real model (interpolated positions, two deepstack layers, text
    # and image cross blocks twice each, the VL adapter), seconds on a CPU.
    "tiny": Groot17Config(
        backbone=CosmosConfig(
            vision=CosmosVisionConfig(
                width=32,
                depth=4,
                num_heads=2,
                mlp_dim=64,
                patch_size=8,
                num_position_embeddings=36,  # a 6 x 6 table interpolated to 4 x 4
                out_width=64,
                deepstack=(1, 2),
            ),
            text=replace(
                COSMOS_REASON2_2B.text,
                width=64,
                depth=4,
                mlp_dim=96,
                num_heads=4,
                num_kv_heads=2,
                head_dim=16,
            ),
            vocab_size=160,
            select_layer=3,
            mrope_section=(4, 2, 2),
            image_token_id=150,
            video_token_id=151,
            vision_start_id=152,
            vision_end_id=153,
        ),
        head=replace(
            N17_HEAD,
            backbone_embedding_dim=64,
            input_embedding_dim=48,
            hidden_size=40,
            max_state_dim=16,
            action_dim=16,
            action_horizon=16,
            max_seq_len=64,
            dit=DiTConfig(
                heads=4,
                head_dim=12,
                layers=8,
                output_dim=40,
                cross_attention_dim=64,
                attend_text_every_n_blocks=2,
            ),
            vl_adapter=VLAdapterConfig(heads=4, head_dim=16, layers=2),
        ),
        image_size=32,  # 4 x 4 patches -> 4 tokens per image
    ),
}


class Groot17Batch(NamedTuple):
    """A batch's inputs to the sampler (n17_policy.collate), every tensor with the rows first."""

    pixels: Tensor  # (B, V, 3, S, S) normalised, a row's images in prompt order; zero images after them
    input_ids: Tensor  # (B, L) left-padded; t <|image_pad|> ids per image
    attention_mask: Tensor  # (B, L) bool
    positions: Tensor  # (B, 3, L) M-RoPE positions (time, row, column); padding: 1
    state: Tensor  # (B, T_s, max_state_dim) normalised + zero-padded
    embodiment_ids: Tensor  # (B,) long: the projector index of the embodiment-specific layers


class Groot17(GrootNetwork):
    """The whole N1.7 network: Cosmos backbone + action head."""

    def __init__(self, cfg: Groot17Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = CosmosBackbone(cfg.backbone)
        self.action_head = ActionHead(cfg.head)

    def features(self, batch: Groot17Batch, check: bool) -> Tensor:
        positions = batch.positions.transpose(0, 1)  # (3, B, L)
        return self.backbone(
            batch.pixels.to(self.dtype), batch.input_ids, batch.attention_mask, positions, check
        )

    def image_mask(self, batch: Groot17Batch) -> Tensor:
        return batch.input_ids == self.cfg.backbone.image_token_id
