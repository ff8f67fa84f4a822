"""NVIDIA GR00T N1.7: the Cosmos-Reason2 backbone (cosmos.py) + a flow-matching DiT action head.

What differs from N1.5 (model.py / action_head.py), kept here (the DiT's blocks, the timestep
embedding, the category-specific layers are action_head.py's):

    backbone        Qwen3-VL (cosmos.py) instead of Eagle 2.5; features without the final norm
    image/text      the DiT's cross-attention blocks (even indices) alternate: block i attends to the
                    prompt's text tokens when i % (2 n) == 0 (n = attend_text_every_n_blocks, 2),
                    to its image tokens otherwise; padding is never attended (AlternateVLDiT)
    tokens          [state | actions]: no future tokens (N1.5: [state | 32 future | actions])
    state           state_history_length states, concatenated, enter the state encoder as one token
    VL adapter      present when config.json has vl_self_attention_cfg.num_layers > 0 (the published
                    checkpoints: 4 layers); N1.5 ties it to use_vlln
    sizes           horizon 40, max state / action dims 132, DiT 32 layers (read from config.json)

Legend: B batch, L prompt tokens, Dv backbone width, D DiT width (heads x head_dim), H horizon,
A max action dim, S max state dim, C cross-attention blocks, h/d DiT heads / head dim.

    features (B, L, Dv) --vlln LayerNorm--> --VL adapter (pre-LN self-attention, padding masked)--> vl
    vl --each cross block's to_k / to_v, once per sample--> cross_kv (C, 2, B, h, L, d)
    state (B, T_s, S) --flatten--> (B, 1, T_s S) --state_encoder[emb]--> (B, 1, D)
    x (B, H, A) at step k: tokens = [state | action_encoder[emb](x, bucket) + pos[:H]]
    DiT over the tokens (AdaLayerNorm on temb = MLP(sinusoid(bucket)), cross / self alternating)
    v = action_decoder[emb](out)[:, -H:];  x += v / steps   (tau = k / steps, bucket = int(tau 1000))

Deliberate difference from upstream (only for padded batches): the VL adapter masks padding keys
(upstream attends to them), so a padded batch equals its samples run one by one; a single unpadded
sample is identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models import rtc
from vla_inference.models.common import flow
from vla_inference.models.common.transformer import DecoderConfig
from vla_inference.models.groot.action_head import (
    CategorySpecificMLP,
    MultiEmbodimentActionEncoder,
    TimestepEmbedding,
    TransformerBlock,
)
from vla_inference.models.groot.cosmos import (
    COSMOS_REASON2_2B,
    CosmosBackbone,
    CosmosConfig,
    CosmosVisionConfig,
)


@dataclass(frozen=True)
class DiTConfig:
    num_heads: int = 32
    head_dim: int = 48
    depth: int = 32
    output_dim: int = 1024
    norm_eps: float = 1e-5
    attend_text_every: int = 2  # attend_text_every_n_blocks

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class AdapterConfig:
    """The VL self-attention adapter (vl_self_attention_cfg)."""

    num_heads: int = 32
    head_dim: int = 64
    depth: int = 4

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class HeadConfig:
    backbone_width: int = 2048  # backbone_embedding_dim
    input_width: int = 1536  # input_embedding_dim (= the DiT's width)
    hidden: int = 1024  # hidden_size (state encoder / decoder MLPs; the DiT's output)
    max_state_dim: int = 132
    max_action_dim: int = 132
    horizon: int = 40
    state_history: int = 1
    max_seq_len: int = 1024
    embodiments: int = 32
    timestep_buckets: int = 1000
    inference_steps: int = 4
    add_pos_embed: bool = True
    use_vlln: bool = True
    dit: DiTConfig = DiTConfig()
    adapter: AdapterConfig | None = AdapterConfig()


@dataclass(frozen=True)
class Groot17Config:
    backbone: CosmosConfig
    head: HeadConfig
    image_size: int = 256  # image_target_size: the processor's output side

    @classmethod
    def named(cls, name: str, **overrides: object) -> Groot17Config:
        return replace(SIZES[name], **overrides)  # type: ignore[arg-type]

    @property
    def tokens_per_image(self) -> int:
        return self.backbone.vision.tokens_per_image(self.image_size, self.image_size)


SIZES: dict[str, Groot17Config] = {
    # nvidia/GR00T-N1.7-3B: Cosmos-Reason2-2B cut at layer 16, DiT 32 layers, VL adapter 4 layers.
    "n1.7-3b": Groot17Config(backbone=COSMOS_REASON2_2B, head=HeadConfig()),
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
            text=DecoderConfig(
                width=64,
                depth=4,
                mlp_dim=96,
                num_heads=4,
                num_kv_heads=2,
                head_dim=16,
                rope_theta=5_000_000.0,
                norm_eps=1e-6,
                qk_norm=True,
            ),
            vocab_size=160,
            select_layer=3,
            mrope_section=(4, 2, 2),
            image_token_id=150,
            video_token_id=151,
            vision_start_id=152,
            vision_end_id=153,
        ),
        head=HeadConfig(
            backbone_width=64,
            input_width=48,
            hidden=40,
            max_state_dim=16,
            max_action_dim=16,
            horizon=16,
            max_seq_len=64,
            dit=DiTConfig(num_heads=4, head_dim=12, depth=8, output_dim=40),
            adapter=AdapterConfig(num_heads=4, head_dim=16, depth=2),
        ),
        image_size=32,  # 4 x 4 patches -> 4 tokens per image
    ),
}


# ---- the DiT ----------------------------------------------------------------------------------


class AlternateVLDiT(nn.Module):
    """N1.5's DiT blocks (action_head.TransformerBlock, AdaLayerNorm, odd blocks self-attention)
    whose cross-attention blocks alternate between the prompt's text and image tokens."""

    def __init__(self, cfg: DiTConfig, cross_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.width
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                cfg.num_heads,
                cfg.head_dim,
                ada_norm=True,
                affine=False,
                eps=cfg.norm_eps,
                kv_dim=None if self.is_self_attention(i) else cross_width,
            )
            for i in range(cfg.depth)
        )
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, cfg.output_dim)

    @staticmethod
    def is_self_attention(index: int) -> bool:
        return index % 2 == 1

    def attends_text(self, index: int) -> bool:
        return index % (2 * self.cfg.attend_text_every) == 0

    @property
    def cross_blocks(self) -> list[int]:
        return [i for i in range(self.cfg.depth) if not self.is_self_attention(i)]

    def cross_kv(self, vl: Tensor) -> Tensor:
        """vl (B, L, Dv) -> the cross blocks' keys/values (C, 2, B, h, L, d), computed once."""
        blocks = [cast(TransformerBlock, self.blocks[i]) for i in self.cross_blocks]
        return torch.stack([torch.stack(block.attn.project_kv(vl)) for block in blocks])

    def forward(
        self, x: Tensor, cross_kv: Tensor, text_mask: Tensor, image_mask: Tensor, t: Tensor
    ) -> Tensor:
        """x (B, T, D), cross_kv (C, 2, B, h, L, d), text/image key masks (B, L) bool, t (B,) buckets
        -> (B, T, D_out)."""
        temb = self.timestep_embedder(t)  # (B, D)
        cross = 0
        for i, block in enumerate(self.blocks):
            if self.is_self_attention(i):
                x = block(x, temb)
                continue
            mask = text_mask if self.attends_text(i) else image_mask
            x = block(x, temb, key_mask=mask, kv=(cross_kv[cross, 0], cross_kv[cross, 1]))
            cross += 1
        shift, scale = self.proj_out_1(F.silu(temb)).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        return self.proj_out_2(x)


# ---- the head ---------------------------------------------------------------------------------


class StepInputs(NamedTuple):
    """What every Euler step of a sample reads: made once per sample by Groot17.context."""

    cross_kv: Tensor  # (C, 2, B, h, L, d)
    text_mask: Tensor  # (B, L) bool: real, non-image tokens
    image_mask: Tensor  # (B, L) bool: real image tokens
    state_feat: Tensor  # (B, 1, D)
    embodiment_ids: Tensor  # (B,) long


class ActionHead17(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, D = cfg.embodiments, cfg.input_width
        self.dit = AlternateVLDiT(cfg.dit, cfg.backbone_width)
        self.state_encoder = CategorySpecificMLP(n, cfg.max_state_dim * cfg.state_history, cfg.hidden, D)
        self.action_encoder = MultiEmbodimentActionEncoder(cfg.max_action_dim, D, n)
        self.action_decoder = CategorySpecificMLP(n, cfg.hidden, cfg.hidden, cfg.max_action_dim)
        self.vlln: nn.Module = nn.LayerNorm(cfg.backbone_width) if cfg.use_vlln else nn.Identity()
        adapter = cfg.adapter
        self.vl_adapter = (
            nn.ModuleList(
                TransformerBlock(
                    adapter.width,
                    adapter.num_heads,
                    adapter.head_dim,
                    ada_norm=False,
                    affine=True,
                    eps=1e-5,
                    kv_dim=None,
                )
                for _ in range(adapter.depth)
            )
            if adapter is not None and adapter.depth > 0
            else None
        )
        self.position_embedding = nn.Parameter(torch.zeros(cfg.max_seq_len, D)) if cfg.add_pos_embed else None

    def process_backbone(self, features: Tensor, mask: Tensor) -> Tensor:
        x = self.vlln(features)
        for block in self.vl_adapter or ():
            x = block(x, key_mask=mask)
        return x

    def encode_state(self, state: Tensor, ids: Tensor) -> Tensor:
        """state (B, T_s, S) -> (B, 1, D): the history as one token."""
        return self.state_encoder(state.reshape(state.shape[0], 1, -1), ids)

    def velocity(self, inputs: StepInputs, x: Tensor, bucket: Tensor) -> Tensor:
        """One DiT evaluation: noisy actions x (B, H, A) at bucket (B,) -> velocity (B, H, A). No
        host synchronisation."""
        ids = inputs.embodiment_ids
        a = self.action_encoder(x, bucket, ids)  # (B, H, D)
        if self.position_embedding is not None:
            a = a + self.position_embedding[: a.shape[1]][None]
        tokens = torch.cat([inputs.state_feat, a], dim=1)  # (B, 1 + H, D)
        out = self.dit(tokens, inputs.cross_kv, inputs.text_mask, inputs.image_mask, bucket)
        return self.action_decoder(out, ids)[:, -x.shape[1] :]

    def time_bucket(self, x: Tensor, step: int, steps: int) -> Tensor:
        """The DiT's time (B,) long at `step`: int(step / steps * num_timestep_buckets)."""
        return torch.full((x.shape[0],), int(step / steps * self.cfg.timestep_buckets), device=x.device)


# ---- the network ------------------------------------------------------------------------------


class Groot17(nn.Module):
    """The whole N1.7 network. `context` once per sample, then `step` per Euler step (the eager
    `sample` and a compiled runner both call them)."""

    def __init__(self, cfg: Groot17Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = CosmosBackbone(cfg.backbone)
        self.action_head = ActionHead17(cfg.head)

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.visual.pos_embed.dtype

    def context(
        self,
        pixels: Tensor,  # (N, 3, S, S) normalised, all images of the batch in prompt order
        input_ids: Tensor,  # (B, L)
        attention_mask: Tensor,  # (B, L) bool
        positions: Tensor,  # (3, B, L) cosmos.mrope_positions
        state: Tensor,  # (B, T_s, S) normalised + zero-padded
        embodiment_ids: Tensor,  # (B,) long
        check: bool = True,
    ) -> StepInputs:
        """Backbone, VL adapter, the DiT's cross-attention keys/values and the state token: what
        does not change between Euler steps."""
        head = self.action_head
        features = self.backbone(pixels.to(self.dtype), input_ids, attention_mask, positions, check)
        vl = head.process_backbone(features, attention_mask)
        image = input_ids == self.cfg.backbone.image_token_id
        return StepInputs(
            head.dit.cross_kv(vl),
            attention_mask & ~image,
            attention_mask & image,
            head.encode_state(state.to(self.dtype), embodiment_ids),
            embodiment_ids,
        )

    def step(
        self,
        inputs: StepInputs,
        x: Tensor,  # (B, H, A)
        tau: Tensor,  # (B,) step / steps
        bucket: Tensor,  # (B,) long, the DiT's time
        noise: Tensor,  # (B, H, A)
        prefix: rtc.StaticPrefix,
        steps: int,
    ) -> tuple[Tensor, Tensor]:
        """One Euler step (flow.static_step: hard and constant-velocity guided real-time chunking
        on the rows that ask, zeros elsewhere). Returns (x after the step, velocity)."""

        def velocity(x_in: Tensor) -> Tensor:
            return self.action_head.velocity(inputs, x_in, bucket)

        return flow.static_step(velocity, x, tau, 1.0 / steps, noise, prefix)

    def sample(
        self,
        pixels: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        positions: Tensor,
        state: Tensor,
        embodiment_ids: Tensor,
        noise: Tensor,  # (B, H, A)
        steps: int | None = None,
        prefix: rtc.BatchPrefix | None = None,  # guided with the Jacobian needs grad mode
    ) -> tuple[Tensor, Tensor]:
        """The eager sampler: context once, then the steps; returns (normalised actions, the last
        velocity), both (B, H, A)."""
        steps = steps or self.cfg.head.inference_steps
        inputs = self.context(pixels, input_ids, attention_mask, positions, state, embodiment_ids)
        noise = noise.to(self.dtype)
        head = self.action_head
        if prefix is not None and prefix.needs_backward:

            def velocity(x: Tensor, step: int) -> Tensor:
                return head.velocity(inputs, x, head.time_bucket(x, step, steps))

            return flow.euler(velocity, noise, steps, prefix)
        chunking = rtc.BatchPrefix.static_inputs(prefix, noise)
        x, v = noise, torch.zeros_like(noise)
        for k in range(steps):
            x, v = self.step(
                inputs, x, flow.step_time(x, k, steps), head.time_bucket(x, k, steps), noise, chunking, steps
            )
        return flow.finish(x, chunking.actions, chunking.hard_mask), v


def cross_kv_shape(cfg: Groot17Config, batch: int, prompt_len: int) -> tuple[int, ...]:
    """The shape of StepInputs.cross_kv (a compiled runner's persistent buffer)."""
    dit = cfg.head.dit
    blocks = sum(not AlternateVLDiT.is_self_attention(i) for i in range(dit.depth))
    return (blocks, 2, batch, dit.num_heads, prompt_len, dit.head_dim)


__all__: Sequence[str] = (
    "SIZES",
    "ActionHead17",
    "AdapterConfig",
    "AlternateVLDiT",
    "DiTConfig",
    "Groot17",
    "Groot17Config",
    "HeadConfig",
    "StepInputs",
    "cross_kv_shape",
)
