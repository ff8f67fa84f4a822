"""The GR00T action head as NVIDIA publishes it (N1.5 and N1.7 share it), for the tests: the
checkpoint's parameter shapes (Isaac-GR00T's module names) and the embodiment-specific layers'
formulas written out over the checkpoint's tensors (y = x W[id] + b[id]), independent of our code."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F


def published_head_shapes(
    state: int, action: int, dit_layers: int, future_tokens: int
) -> dict[str, tuple[int, ...]]:
    """The head's tensors (DiT width 1536 = 32 x 48, output 1024, backbone 2048, 32 embodiments, a
    4-block VL adapter): N1.5 state 64 / action 32 / 16 DiT blocks / 32 future tokens; N1.7
    132 / 132 / 32 / none."""
    d, cats, hid, bb = 1536, 32, 1024, 2048
    f: dict[str, tuple[int, ...]] = {}

    def linear(name: str, i: int, o: int) -> None:
        f[name + ".weight"], f[name + ".bias"] = (o, i), (o,)

    def cat_linear(name: str, i: int, o: int) -> None:
        f[name + ".W"], f[name + ".b"] = (cats, i, o), (cats, o)

    p = "action_head.model."
    linear(p + "timestep_encoder.timestep_embedder.linear_1", 256, d)
    linear(p + "timestep_encoder.timestep_embedder.linear_2", d, d)
    for i in range(dit_layers):
        b = f"{p}transformer_blocks.{i}."
        kv = bb if i % 2 == 0 else d  # even blocks cross-attend to the 2048-wide backbone tokens
        linear(b + "norm1.linear", d, 2 * d)  # AdaLayerNorm; norm3 has no affine params in the DiT
        linear(b + "attn1.to_q", d, d)
        linear(b + "attn1.to_k", kv, d)
        linear(b + "attn1.to_v", kv, d)
        linear(b + "attn1.to_out.0", d, d)
        linear(b + "ff.net.0.proj", d, 4 * d)
        linear(b + "ff.net.2", 4 * d, d)
    linear(p + "proj_out_1", d, 2 * d)
    linear(p + "proj_out_2", d, hid)
    for i in range(4):
        b = f"action_head.vl_self_attention.transformer_blocks.{i}."
        f[b + "norm1.weight"], f[b + "norm1.bias"] = (bb,), (bb,)
        f[b + "norm3.weight"], f[b + "norm3.bias"] = (bb,), (bb,)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            linear(b + "attn1." + proj, bb, bb)
        linear(b + "ff.net.0.proj", bb, 4 * bb)
        linear(b + "ff.net.2", 4 * bb, bb)
    cat_linear("action_head.state_encoder.layer1", state, hid)  # N1.7: max_state_dim x history
    cat_linear("action_head.state_encoder.layer2", hid, d)
    cat_linear("action_head.action_encoder.W1", action, d)
    cat_linear("action_head.action_encoder.W2", 2 * d, d)
    cat_linear("action_head.action_encoder.W3", d, d)
    cat_linear("action_head.action_decoder.layer1", hid, hid)
    cat_linear("action_head.action_decoder.layer2", hid, action)
    if future_tokens:
        f["action_head.future_tokens.weight"] = (future_tokens, d)
    f["action_head.position_embedding.weight"] = (1024, d)
    f["action_head.vlln.weight"], f["action_head.vlln.bias"] = (bb,), (bb,)
    return f


def cat_linear(w: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """CategorySpecificLinear: y = x W[id] + b[id], x (B, T, in), ids (B,)."""
    return torch.einsum("bti,bio->bto", x, w[name + ".W"][ids]) + w[name + ".b"][ids][:, None]


def cat_mlp(w: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """CategorySpecificMLP: layer2(relu(layer1(x)))."""
    return cat_linear(w, name + ".layer2", F.relu(cat_linear(w, name + ".layer1", x, ids)), ids)


def encode_actions(
    w: Mapping[str, torch.Tensor], a: torch.Tensor, bucket: torch.Tensor, ids: torch.Tensor, width: int
) -> torch.Tensor:
    """MultiEmbodimentActionEncoder: W3(swish(W2([W1 a, sinusoid(bucket)]))), the sinusoid
    [sin, cos](bucket 10000^(-k / half)), the same for every row of the chunk."""
    h = cat_linear(w, "action_head.action_encoder.W1", a, ids)
    half = width // 2
    freqs = torch.exp(-torch.arange(half) * math.log(10000.0) / half)
    angle = bucket.float()[:, None, None] * freqs  # (B, 1, half)
    tau = torch.cat([angle.sin(), angle.cos()], -1).expand(-1, a.shape[1], -1)
    x = cat_linear(w, "action_head.action_encoder.W2", torch.cat([h, tau], -1), ids)
    return cat_linear(w, "action_head.action_encoder.W3", x * torch.sigmoid(x), ids)
