"""GR00T N1.7's backbone: Cosmos-Reason2-2B, a Qwen3-VL vision tower and a Qwen3 language model cut
at `select_layer` (NVIDIA/Isaac-GR00T gr00t/model/modules/qwen3_backbone.py; transformers' Qwen3-VL).

Written from the published architecture, not copied, on the shared pieces of models/common
(Decoder layers with q/k RMSNorm, the ViT MLP, rotate-half RoPE). Legend: N images, P patch side,
Tp temporal patch (2: an image is its frame twice), m spatial merge (2), g = (S/P)^2 patches per
image, t = g / m^2 tokens per image, W/Wo vision width / output width, B batch, L prompt tokens.

    pixels (N, 3, S, S) normalised -> patches (N, g, 3*Tp*P*P), ordered window by window (the m x m
        patches a merged token covers are consecutive, as the Qwen2-VL image processor orders them)
    -> patch_embed (a Linear: upstream's Conv3d with stride = kernel) + learned positions
        (a side x side table, bilinearly interpolated to the image's grid)
    -> blocks (pre-LN, fused qkv with bias, 2-D rotary over (row, column), tanh-GELU MLP), each image
        attending only to itself; after block i in `deepstack`, a merger of its own -> (N, t, Wo)
    -> merger: LN, m x m patches concatenated, Linear-GELU-Linear -> (N, t, Wo)   (image tokens)
    prompt ids (B, L) with t <|image_pad|> ids per image --embed, each row's image tokens scattered-->
    Qwen3 layers 0..select_layer-1 with interleaved M-RoPE (positions (3, B, L): time, row, column;
        frequency i takes the row position for i = 1, 4, .. < 3 s_h, the column for i = 2, 5, ..
        < 3 s_w, the time otherwise); the k-th deepstack feature is added at the image positions
        after layer k -> features (B, L, Wo): the last layer's output, without the final norm
        (transformers 4.57's hidden_states[-1], which Isaac-GR00T pins; newer transformers put the
        normed state there)

Names are ours; n17_checkpoint.py maps them to the checkpoint's (backbone.model.model.visual...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_inference.models.common.transformer import Decoder, DecoderConfig, apply_rope, attend
from vla_inference.models.common.vit import ViTConfig, ViTMlp
from vla_inference.models.groot.model import QWEN3_1_7B


@dataclass(frozen=True)
class CosmosVisionConfig:
    """Qwen3-VL's vision tower (its own config: ViTConfig has no temporal patch, merger or deepstack)."""

    width: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge: int = 2
    num_position_embeddings: int = 2304  # a 48 x 48 table
    out_width: int = 2048
    deepstack: tuple[int, ...] = (5, 11, 17)
    norm_eps: float = 1e-6
    rope_theta: float = 10_000.0

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    @property
    def block(self) -> ViTConfig:
        """The block's MLP in the shared ViT's terms (tanh-GELU, fc1 -> fc2)."""
        return ViTConfig(self.width, self.depth, self.num_heads, self.mlp_dim, self.patch_size)

    def tokens_per_image(self, height: int, width: int) -> int:
        unit = self.patch_size * self.merge
        return (height // unit) * (width // unit)


@dataclass(frozen=True)
class CosmosConfig:
    vision: CosmosVisionConfig
    text: DecoderConfig  # Qwen3 (q/k RMSNorm, SiLU); `depth` is the LM's, select_layer are built
    vocab_size: int
    select_layer: int
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_id: int = 151652
    vision_end_id: int = 151653


COSMOS_REASON2_2B = CosmosConfig(
    vision=CosmosVisionConfig(),
    # Qwen3-VL-2B's text model: Qwen3-1.7B's sizes (N1.5's LM, model.py) with M-RoPE's theta.
    text=replace(QWEN3_1_7B, rope_theta=5_000_000.0),
    vocab_size=151936,
    select_layer=16,
)


# ---- M-RoPE -----------------------------------------------------------------------------------


def mrope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, section: tuple[int, int, int]
) -> tuple[Tensor, Tensor]:
    """positions (3, B, L) (time, row, column) -> cos, sin (B, 1, L, D) float32, rotate-half layout,
    frequencies interleaved: i % 3 == 1 below 3 section[1] from the row, i % 3 == 2 below
    3 section[2] from the column, the others from the time."""
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / theta**exponent  # (D/2,)
    freqs = positions.float()[..., None] * inv_freq  # (3, B, L, D/2)
    index = torch.arange(head_dim // 2, device=positions.device)
    axis = torch.zeros_like(index)
    axis = torch.where((index % 3 == 1) & (index < 3 * section[1]), 1, axis)
    axis = torch.where((index % 3 == 2) & (index < 3 * section[2]), 2, axis)
    chosen = freqs.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs.shape[1:]))[0]  # (B, L, D/2)
    emb = torch.cat([chosen, chosen], dim=-1)[:, None]  # (B, 1, L, D)
    return emb.cos(), emb.sin()


def mrope_positions(
    input_ids: Tensor, attention_mask: Tensor, grid: tuple[int, int], image_token_id: int
) -> Tensor:
    """The (3, B, L) M-RoPE positions of a batch of prompts whose images all have `grid` = (rows,
    columns) merged tokens (host code, once per request: Qwen3-VL's get_rope_index for images).

    Over the real tokens of a row (padding excluded, given position 1 as upstream does): text
    tokens count on from the largest position so far + 1 on all three axes; an image's t tokens take
    (start, start + r, start + c) for row r, column c, start being where the next text token would
    have been."""
    rows, cols = grid
    per_image = rows * cols
    B, L = input_ids.shape
    out = torch.ones(3, B, L, dtype=torch.long)
    r_index = torch.arange(rows).repeat_interleave(cols)
    c_index = torch.arange(cols).repeat(rows)
    for b in range(B):
        keep = attention_mask[b].bool().cpu()
        ids = input_ids[b].cpu()[keep]
        pos = torch.empty(3, ids.shape[0], dtype=torch.long)
        nxt, i = 0, 0
        while i < ids.shape[0]:
            if int(ids[i]) == image_token_id:
                if i + per_image > ids.shape[0] or bool((ids[i : i + per_image] != image_token_id).any()):
                    raise ValueError(f"an image needs {per_image} consecutive image tokens in the prompt")
                pos[0, i : i + per_image] = nxt
                pos[1, i : i + per_image] = nxt + r_index
                pos[2, i : i + per_image] = nxt + c_index
                nxt = nxt + max(rows, cols)
                i += per_image
            else:
                pos[:, i] = nxt
                nxt, i = nxt + 1, i + 1
        out[:, b, keep] = pos
    return out.to(input_ids.device)


# ---- the vision tower -------------------------------------------------------------------------


class VisionAttention(nn.Module):
    def __init__(self, cfg: CosmosVisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # (N, g, W), cos (1, 1, g, d)
        N, T, _ = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (N, h, g, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.proj(attend(q, k, v, None))


class VisionBlock(nn.Module):
    def __init__(self, cfg: CosmosVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = ViTMlp(cfg.block)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """m x m patches -> one token: LN (per patch, or over the concatenation: `post_norm`, the
    deepstack mergers), Linear, exact GELU, Linear to the LM's width."""

    def __init__(self, cfg: CosmosVisionConfig, post_norm: bool) -> None:
        super().__init__()
        self.post_norm = post_norm
        wide = cfg.width * cfg.merge**2
        self.norm = nn.LayerNorm(wide if post_norm else cfg.width, eps=1e-6)
        self.fc1 = nn.Linear(wide, wide)
        self.fc2 = nn.Linear(wide, cfg.out_width)
        self.window = cfg.merge**2

    def forward(self, x: Tensor) -> Tensor:  # (N, g, W) -> (N, t, Wo)
        N, T, W = x.shape
        wide = (N, T // self.window, self.window * W)
        x = self.norm(x.reshape(wide)) if self.post_norm else self.norm(x).reshape(wide)
        return self.fc2(F.gelu(self.fc1(x)))


class VisionOutput(NamedTuple):
    tokens: Tensor  # (N, t, Wo) the merged image tokens
    deepstack: list[Tensor]  # (N, t, Wo) per deepstack layer, in layer order


class CosmosVision(nn.Module):
    def __init__(self, cfg: CosmosVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_position_embeddings, cfg.width))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, post_norm=False)
        self.deepstack_mergers = nn.ModuleList(PatchMerger(cfg, post_norm=True) for _ in cfg.deepstack)

    def patchify(self, pixels: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, g, 3 * Tp * P * P): window-major patch order, each patch (C, Tp, P, P)
        with the frame repeated over Tp."""
        c = self.cfg
        N, C, H, W = pixels.shape
        P, m = c.patch_size, c.merge
        x = pixels.reshape(N, C, H // (P * m), m, P, W // (P * m), m, P)
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (N, H/Pm, W/Pm, m, m, C, P, P)
        x = x.unsqueeze(6).expand(*x.shape[:6], c.temporal_patch_size, P, P)
        return x.reshape(N, -1, c.patch_dim)

    def window_order(self, rows: int, cols: int) -> tuple[Tensor, Tensor]:
        """(row, column) of each patch in patchify's order, (g,) each."""
        m = self.cfg.merge
        device = self.pos_embed.device
        r = torch.arange(rows, device=device).view(rows // m, 1, m, 1).expand(rows // m, cols // m, m, m)
        c = torch.arange(cols, device=device).view(1, cols // m, 1, m).expand(rows // m, cols // m, m, m)
        return r.reshape(-1), c.reshape(-1)

    def positions(self, rows: int, cols: int) -> Tensor:
        """The learned table bilinearly interpolated to a rows x cols grid (align-corners), in
        window order: (g, W)."""
        side = self.cfg.side
        device = self.pos_embed.device

        def axis(n: int) -> tuple[Tensor, Tensor, Tensor]:
            at = torch.linspace(0, side - 1, n, device=device)
            low = at.int()
            return low.long(), (low + 1).clamp(max=side - 1).long(), at - low

        h0, h1, dh = axis(rows)
        w0, w1, dw = axis(cols)
        table = self.pos_embed
        corners = (
            (h0[:, None] * side + w0[None], (1 - dh)[:, None] * (1 - dw)[None]),
            (h0[:, None] * side + w1[None], (1 - dh)[:, None] * dw[None]),
            (h1[:, None] * side + w0[None], dh[:, None] * (1 - dw)[None]),
            (h1[:, None] * side + w1[None], dh[:, None] * dw[None]),
        )
        grid = sum(table[i] * w.to(table.dtype)[..., None] for i, w in corners)  # (rows, cols, W)
        r, c = self.window_order(rows, cols)
        return grid[r, c]  # type: ignore[index]

    def rotary(self, rows: int, cols: int) -> tuple[Tensor, Tensor]:
        """2-D rotary tables (1, 1, g, d): the first half of the rotated pairs turns with the row,
        the second with the column (theta^(-2i / (d/2)))."""
        d = self.cfg.head_dim
        quarter = torch.arange(0, d // 2, 2, device=self.pos_embed.device, dtype=torch.float32) / (d // 2)
        inv_freq = 1.0 / self.cfg.rope_theta**quarter  # (d/4,)
        r, c = self.window_order(rows, cols)
        half = torch.cat([r.float()[:, None] * inv_freq, c.float()[:, None] * inv_freq], dim=-1)  # (g, d/2)
        emb = torch.cat([half, half], dim=-1)[None, None]
        return emb.cos(), emb.sin()

    def forward(self, pixels: Tensor) -> VisionOutput:
        """pixels (N, 3, H, W) normalised, H and W multiples of P * m -> VisionOutput."""
        c = self.cfg
        rows, cols = pixels.shape[2] // c.patch_size, pixels.shape[3] // c.patch_size
        x = self.patch_embed(self.patchify(pixels.to(self.patch_embed.weight.dtype)))  # (N, g, W)
        x = x + self.positions(rows, cols)[None]
        cos, sin = self.rotary(rows, cols)
        deepstack = []
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin)
            if index in c.deepstack:
                deepstack.append(self.deepstack_mergers[c.deepstack.index(index)](x))
        return VisionOutput(self.merger(x), deepstack)


# ---- the backbone -----------------------------------------------------------------------------


def _scatter_rows(selected: Tensor, rows: Tensor, like: Tensor) -> Tensor:
    """selected (B, L) bool, rows (B, P, D) -> (B, L, D): the k-th selected position of row b takes
    rows[b, k], the others zero. A gather: static shapes, no data-dependent size."""
    B, P = rows.shape[:2]
    within = (torch.cumsum(selected, dim=1) - 1).clamp(min=0)  # (B, L) index among the row's tokens
    index = within + torch.arange(B, device=within.device)[:, None] * P
    gathered = rows.to(like.dtype).flatten(0, 1)[index]  # (B, L, D)
    return torch.where(selected[..., None], gathered, torch.zeros_like(like))


class CosmosBackbone(nn.Module):
    """Vision tower -> image rows scattered into the prompt -> Qwen3 cut at select_layer, with the
    deepstack features added after the first layers."""

    def __init__(self, cfg: CosmosConfig) -> None:
        super().__init__()
        if not 0 < len(cfg.vision.deepstack) < cfg.select_layer:
            raise ValueError(
                f"select_layer {cfg.select_layer} must exceed the "
                f"{len(cfg.vision.deepstack)} deepstack layers"
            )
        self.cfg = cfg
        self.visual = CosmosVision(cfg.vision)
        self.llm = Decoder(cfg.text, vocab_size=cfg.vocab_size, layers=cfg.select_layer)

    def forward(
        self,
        pixels: Tensor,  # (B, V, 3, H, W) normalised: each row's images in prompt order, then zeros
        input_ids: Tensor,  # (B, L)
        attention_mask: Tensor,  # (B, L) bool
        positions: Tensor,  # (3, B, L) mrope_positions
        check: bool = True,
    ) -> Tensor:
        """-> features (B, L, Wo). The k-th image token of row b takes the k-th merged token of row
        b's images. `check` (a host sync) refuses a prompt with more image tokens than its row's V
        images have; the static path skips it (the policy builds prompts and images together)."""
        cfg = self.cfg
        B, V = pixels.shape[:2]
        vision = self.visual(pixels.flatten(0, 1))
        per_row = V * vision.tokens.shape[1]
        embeds = self.llm.embed_tokens(input_ids)  # (B, L, D)
        selected = input_ids == cfg.image_token_id
        if check and int(selected.sum(dim=1).max()) > per_row:
            raise ValueError(
                f"a prompt has {int(selected.sum(dim=1).max())} image tokens, its {V} images have {per_row}"
            )

        def per_image_row(t: Tensor) -> Tensor:  # (B V, t, D) -> (B, V t, D)
            return t.reshape(B, per_row, t.shape[-1])

        x = torch.where(
            selected[..., None], _scatter_rows(selected, per_image_row(vision.tokens), embeds), embeds
        )
        L = x.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        own = torch.eye(L, dtype=torch.bool, device=x.device)  # a padding query sees itself: no NaN
        mask = causal[None, None] & (attention_mask[:, None, None, :] | own)  # (B, 1, L, L)
        cos, sin = mrope_cos_sin(positions, cfg.text.head_dim, cfg.text.rope_theta, cfg.mrope_section)
        for index, layer in enumerate(self.llm.layers):
            x = layer(x, cos, sin, mask)
            if index < len(vision.deepstack):  # fewer than select_layer (checked at build)
                x = x + _scatter_rows(selected, per_image_row(vision.deepstack[index]), x)
        return x
