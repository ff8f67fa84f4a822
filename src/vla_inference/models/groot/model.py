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
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from vla_inference.models import rtc
from vla_inference.models.common import flow, static
from vla_inference.models.common.transformer import Decoder, DecoderConfig
from vla_inference.models.common.vit import VisionTower, ViTConfig
from vla_inference.models.groot.action_head import ActionHead

STATIC_INSTRUCTION_TOKENS = 64  # VLA_COMPILE: instruction tokens the compiled prompt length allows


@dataclass(frozen=True)
class GrootConfig:
    # --- vision tower (SiglipVisionModel layout; N1.5 ships SigLIP2-400M weights in it) ---
    vit_hidden: int = 1152
    vit_layers: int = 27
    vit_heads: int = 16
    vit_intermediate: int = 4304
    vit_eps: float = 1e-6
    patch_size: int = 14
    image_size: int = 224
    # --- connector (Eagle mlp1) ---
    use_pixel_shuffle: bool = False  # N1.5: "1mlp_nops" = one Linear, no pixel shuffle
    downsample_ratio: float = 0.5
    mlp_connector_layers: int = 1
    # --- language model (Qwen3-1.7B, truncated) ---
    vocab_size: int = 151680
    llm_hidden: int = 2048
    llm_layers: int = 28  # as in the LM config; only `select_layer` of them are built
    select_layer: int = 12
    llm_heads: int = 16
    llm_kv_heads: int = 8
    llm_head_dim: int = 128
    llm_intermediate: int = 6144
    rope_theta: float = 1_000_000.0
    rms_eps: float = 1e-6
    image_token_id: int = 151669  # <IMG_CONTEXT>
    project_to_dim: int | None = None  # backbone.eagle_linear; None in N1.5
    # --- action head ---
    backbone_embedding_dim: int = 2048
    input_embedding_dim: int = 1536
    hidden_size: int = 1024
    max_state_dim: int = 64
    action_dim: int = 32
    action_horizon: int = 16
    num_target_vision_tokens: int = 32
    max_seq_len: int = 1024
    max_num_embodiments: int = 32
    num_timestep_buckets: int = 1000
    num_inference_timesteps: int = 4
    add_pos_embed: bool = True
    use_vlln: bool = True
    # DiT
    dit_heads: int = 32
    dit_head_dim: int = 48
    dit_layers: int = 16
    dit_output_dim: int = 1024
    cross_attention_dim: int = 2048
    interleave_self_attention: bool = True
    dit_norm_eps: float = 1e-5
    # VL self-attention adapter
    vlsa_heads: int = 32
    vlsa_head_dim: int = 64
    vlsa_layers: int = 4

    @property
    def num_image_tokens(self) -> int:
        side = self.image_size // self.patch_size
        if self.use_pixel_shuffle:
            return int(side * side * self.downsample_ratio**2)
        return side * side

    @property
    def vision(self) -> ViTConfig:
        """The SigLIP tower (SiglipVisionModel layout; N1.5 ships SigLIP2-400M weights in it)."""
        return ViTConfig(
            width=self.vit_hidden,
            depth=self.vit_layers,
            num_heads=self.vit_heads,
            mlp_dim=self.vit_intermediate,
            patch_size=self.patch_size,
            image_size=self.image_size,
            norm_eps=self.vit_eps,
        )

    @property
    def llm(self) -> DecoderConfig:
        """Qwen3 (q/k RMSNorm, SiLU), of which the first `select_layer` layers are built."""
        return DecoderConfig(
            width=self.llm_hidden,
            depth=self.llm_layers,
            mlp_dim=self.llm_intermediate,
            num_heads=self.llm_heads,
            num_kv_heads=self.llm_kv_heads,
            head_dim=self.llm_head_dim,
            rope_theta=self.rope_theta,
            norm_eps=self.rms_eps,
            qk_norm=True,
        )

    @property
    def dit_inner_dim(self) -> int:
        return self.dit_heads * self.dit_head_dim

    @property
    def vlsa_inner_dim(self) -> int:
        return self.vlsa_heads * self.vlsa_head_dim


SIZES: dict[str, GrootConfig] = {
    "n1.5-3b": GrootConfig(),
    # Tiny: every code path of the real model, seconds on a CPU.
    "tiny": GrootConfig(
        vit_hidden=32,
        vit_layers=2,
        vit_heads=2,
        vit_intermediate=64,
        patch_size=8,
        image_size=32,  # 4 x 4 = 16 image tokens
        vocab_size=96,
        llm_hidden=64,
        llm_layers=4,
        select_layer=2,
        llm_heads=4,
        llm_kv_heads=2,
        llm_head_dim=16,
        llm_intermediate=96,
        image_token_id=95,
        backbone_embedding_dim=64,
        input_embedding_dim=48,
        hidden_size=40,
        max_state_dim=16,
        action_dim=8,
        action_horizon=16,
        num_target_vision_tokens=4,
        max_seq_len=64,
        dit_heads=4,
        dit_head_dim=12,
        dit_layers=4,
        dit_output_dim=40,
        cross_attention_dim=64,
        vlsa_heads=4,
        vlsa_head_dim=16,
        vlsa_layers=2,
    ),
}


def config_for(name: str, **overrides: object) -> GrootConfig:
    return replace(SIZES[name], **overrides)  # type: ignore[arg-type]


class EagleBackbone(nn.Module):
    """SigLIP tower -> mlp1 connector -> image rows scattered into the prompt -> truncated Qwen3."""

    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        vit_out = cfg.vit_hidden * (int(1 / cfg.downsample_ratio) ** 2 if cfg.use_pixel_shuffle else 1)
        if cfg.mlp_connector_layers == 2:
            self.mlp1 = nn.Sequential(
                nn.LayerNorm(vit_out),
                nn.Linear(vit_out, cfg.llm_hidden),
                nn.GELU(),
                nn.Linear(cfg.llm_hidden, cfg.llm_hidden),
            )
        elif cfg.mlp_connector_layers == 1:
            self.mlp1 = nn.Sequential(nn.Linear(vit_out, cfg.llm_hidden))
        else:
            raise ValueError(f"mlp_connector_layers must be 1 or 2, got {cfg.mlp_connector_layers}")
        # Upstream keeps hidden_states[select_layer] of the LM cut to select_layer layers; HF applies
        # the final norm to the last hidden state, hence the Decoder's norm.
        self.llm = Decoder(cfg.llm, vocab_size=cfg.vocab_size, layers=cfg.select_layer)
        self.eagle_linear = (
            nn.Linear(cfg.llm_hidden, cfg.project_to_dim) if cfg.project_to_dim is not None else None
        )

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
        """pixels (N_img, 3, S, S), input_ids / attention_mask (B, L) -> features (B, L, D).

        The k-th <IMG_CONTEXT> id of the batch (row-major) takes the k-th image token. `check`
        (a host sync) refuses a prompt whose count differs from the images'; the static path
        passes zero images beyond the counted ones instead and skips it."""
        embeds = self.llm.embed_tokens(input_ids)  # (B, L, D)
        vit = self.image_features(pixels)  # (N_img, T_img, D)
        selected = input_ids == self.cfg.image_token_id  # (B, L)
        if check and int(selected.sum()) != vit.shape[0] * vit.shape[1]:
            raise ValueError(
                f"prompt has {int(selected.sum())} image tokens, "
                f"the {vit.shape[0]} images have {vit.shape[1]} tokens each"
            )
        # masked_scatter written as a gather: static shapes, no data-dependent size
        index = (torch.cumsum(selected.flatten(), 0) - 1).clamp(min=0).view(selected.shape)  # (B, L)
        rows = vit.to(embeds.dtype).flatten(0, 1)[index]  # (B, L, D)
        embeds = torch.where(selected[..., None], rows, embeds)
        B, L, _ = embeds.shape
        positions = torch.arange(L, device=embeds.device)[None].expand(B, L)
        causal = torch.ones(L, L, dtype=torch.bool, device=embeds.device).tril()
        mask = causal[None, None] & attention_mask[:, None, None, :]  # (B, 1, L, L)
        hidden = self.llm(embeds, positions, mask)
        return hidden if self.eagle_linear is None else self.eagle_linear(hidden)


class GR00TN15(nn.Module):
    """The whole policy network. `sample` is the inference entry point."""

    def __init__(self, cfg: GrootConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = EagleBackbone(cfg)
        self.action_head = ActionHead(cfg)

    def sample(
        self,
        pixels: Tensor,  # (N_img, 3, S, S) normalised, all images of the batch in prompt order
        input_ids: Tensor,  # (B, L) right-padded
        attention_mask: Tensor,  # (B, L) bool
        state: Tensor,  # (B, 1, max_state_dim) normalised + zero-padded
        embodiment_ids: Tensor,  # (B,) long
        noise: Tensor,  # (B, H, action_dim)
        steps: int | None = None,
        prefix: rtc.BatchPrefix | None = None,  # real-time chunking rows (needs grad mode if guided)
    ) -> tuple[Tensor, Tensor]:
        dtype = self.action_head.future_tokens.dtype
        features = self.backbone(pixels.to(dtype), input_ids, attention_mask)
        vl = self.action_head.process_backbone(features, attention_mask)
        return self.action_head.sample(
            vl,
            attention_mask,
            state.to(dtype),
            embodiment_ids,
            noise.to(dtype),
            steps or self.cfg.num_inference_timesteps,
            prefix,
        )

    # --- static shapes (VLA_COMPILE: GrootStatic, models/common/static.py) --------------------

    def context_static(
        self, cross_kv: Tensor, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor
    ) -> None:
        """Backbone, VL adapter and the DiT's cross-attention keys/values of a padded batch, written
        into cross_kv (C, 2, B, h, L, d) in place (C cross-attention blocks)."""
        dtype = self.action_head.future_tokens.dtype
        features = self.backbone(pixels.to(dtype), input_ids, attention_mask, check=False)
        vl = self.action_head.process_backbone(features, attention_mask)
        for i, (k, v) in enumerate(self.action_head.dit.cross_kv(vl)):
            cross_kv[i, 0].copy_(k)
            cross_kv[i, 1].copy_(v)

    def step_static(
        self,
        cross_kv: Tensor,
        attention_mask: Tensor,
        state: Tensor,
        embodiment_ids: Tensor,
        x: Tensor,
        tau: Tensor,
        bucket: Tensor,
        noise: Tensor,
        prefix: rtc.StaticPrefix,
        steps: int,
    ) -> tuple[Tensor, Tensor]:
        """One Euler step of sample (flow.static_step) against the cached cross-attention
        keys/values, with the batch's hard and constant-velocity guided real-time chunking (none:
        zeros). tau (B,) = step / steps, bucket (B,) the DiT's time. Returns (x after the step,
        velocity)."""
        head = self.action_head
        state_feat = head.state_encoder(state, embodiment_ids)  # (B, 1, D)
        kv = [(cross_kv[i, 0], cross_kv[i, 1]) for i in range(cross_kv.shape[0])]

        def velocity(x_in: Tensor) -> Tensor:
            return head.velocity(kv, attention_mask, state_feat, x_in, bucket, embodiment_ids)

        return flow.static_step(velocity, x, tau, 1.0 / steps, noise, prefix)


class GrootStatic:
    """GR00TN15.sample with static shapes (VLA_COMPILE; models/common/static.py).

    prompt    right-padded to `prompt_len` (padding masked; the LM is causal) and the images to
              `images_per_row` per row (zero images past the counted ones are never read), so the
              DiT's cross-attention keys/values go into one cache allocated once per bucket;
    compiled  context_static (SigLIP, Eagle LM, VL adapter, cross-attention keys/values) and
              step_static (one Euler step through the DiT), each once per bucket;
    chunking  none, hard, and guided with the velocity held constant; guidance with the Jacobian
              is refused here (the policy runs it eagerly).
    A batch with a longer prompt or more images does not fit (`fits`); the policy runs it eagerly.
    """

    def __init__(
        self,
        model: GR00TN15,
        prompt_len: int,  # tokens: every prompt is padded to this
        images_per_row: int,  # camera views per sample: missing ones are zero images
        *,
        compile: bool = True,
        backend: str | None = None,
    ) -> None:
        self.device = model.action_head.future_tokens.device
        self.model, self.prompt_len, self.images_per_row = model, prompt_len, images_per_row
        self.compiled = compile
        wrap = functools.partial(static.compile_static, device=self.device, backend=backend)
        self._context = wrap(model.context_static) if compile else model.context_static
        self._step = wrap(model.step_static) if compile else model.step_static
        self._caches: dict[int, Tensor] = {}
        self._times: dict[tuple[int, int, torch.dtype], list[tuple[Tensor, Tensor]]] = {}

    def fits(self, prompt_len: int, images_per_row: int) -> bool:
        return prompt_len <= self.prompt_len and images_per_row <= self.images_per_row

    def cache(self, bucket: int) -> Tensor:
        """The bucket's cross-attention keys/values (C, 2, bucket, h, prompt_len, d), made once."""
        cache = self._caches.get(bucket)
        if cache is None:
            cfg = self.model.cfg
            blocks = sum(not self.model.action_head.dit.is_self_attention(i) for i in range(cfg.dit_layers))
            shape = (blocks, 2, bucket, cfg.dit_heads, self.prompt_len, cfg.dit_head_dim)
            like = self.model.action_head.future_tokens
            cache = static.persistent(torch.zeros(shape, dtype=like.dtype, device=like.device))
            self._caches[bucket] = cache
        return cache

    def times(self, bucket: int, steps: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """(tau, DiT bucket) (bucket,) per step, as the eager sampler makes them."""
        key = (bucket, steps, dtype)
        if key not in self._times:
            head = self.model.action_head
            like = torch.empty(bucket, 1, dtype=dtype, device=self.device)
            self._times[key] = [
                (flow.step_time(like, i, steps), head.time_bucket(like, i, steps)) for i in range(steps)
            ]
        return self._times[key]

    def sample(
        self,
        pixels: Sequence[Tensor],  # per row (V_i, 3, S, S) normalised, V_i <= images_per_row
        input_ids: Tensor,  # (B, L) right-padded, L <= prompt_len
        attention_mask: Tensor,  # (B, L) bool
        state: Tensor,  # (B, 1, max_state_dim)
        embodiment_ids: Tensor,  # (B,) long
        noise: Tensor,  # (B, H, action_dim)
        steps: int | None = None,
        prefix: rtc.BatchPrefix | None = None,
    ) -> tuple[Tensor, Tensor]:
        """As GR00TN15.sample, the images given per row."""
        if not self.fits(input_ids.shape[1], max(p.shape[0] for p in pixels)):
            raise ValueError("the batch exceeds the static prompt length or images per row")
        steps = steps or self.model.cfg.num_inference_timesteps
        dtype = self.model.action_head.future_tokens.dtype
        with torch.inference_mode():
            noise = noise.to(dtype)
            chunking = rtc.BatchPrefix.static_inputs(prefix, noise)  # bf16 on CUDA too
            ids = static.pad_columns(input_ids, self.prompt_len)
            mask = static.pad_columns(attention_mask, self.prompt_len, False)
            rows = (ids, mask, state.to(dtype), embodiment_ids, noise, *chunking)

            def run(bucket: int, start: int, stop: int, piece: list[Tensor]) -> tuple[Tensor, Tensor]:
                images = list(pixels[start:stop])
                images += [images[-1]] * (bucket - len(images))  # the padding rows' images
                flat = torch.cat(images)
                spare = bucket * self.images_per_row - flat.shape[0]
                if spare:
                    flat = torch.cat([flat, flat.new_zeros(spare, *flat.shape[1:])])
                return self._run(bucket, steps, flat, piece)

            actions, velocities = static.run_in_pieces(rows, run)
            return actions, velocities

    def _run(self, bucket: int, steps: int, pixels: Tensor, piece: list[Tensor]) -> tuple[Tensor, Tensor]:
        """One bucket: pixels (bucket * images_per_row, 3, S, S); piece = the padded rows (ids, mask,
        state, embodiment_ids, noise, then the StaticPrefix's four)."""
        ids, mask, state, embodiment_ids, noise = piece[:5]
        chunking = rtc.StaticPrefix(*piece[5:])
        cache = self.cache(bucket)
        static.begin_call(self.device)
        self._context(cache, pixels, ids, mask)

        def step(x: Tensor, tau: Tensor, time_bucket: Tensor) -> tuple[Tensor, Tensor]:
            args = (cache, mask, state, embodiment_ids, x, tau, time_bucket, noise, chunking)
            return self._step(*args, steps)

        return static.denoise(step, self.times(bucket, steps, noise.dtype), noise, chunking)
