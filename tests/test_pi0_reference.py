"""pi0 / pi0.5 against independent references, on tiny random weights (fp32).

openpi's PyTorch pi0 is built from transformers' SigLIP and Gemma modules, so these are the
reference for the shared modules: our VisionTower vs SiglipVisionModel, our Decoder (one expert
alone, causal) vs GemmaModel, the joint attention of both experts vs openpi's layer recipe written
out with transformers' Gemma pieces. pi0.5's own parts (adaptive RMSNorm and the time MLP) have no
transformers counterpart: they are checked against openpi's formulas written out here. Weights are
copied through the openpi name map, so the tests also check that it puts every tensor where the
reference expects it.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.gemma import modeling_gemma

from tests.helpers.reference import copy_from_reference, randomise
from vla_inference.models.common.masks import block_causal_mask, present_slots
from vla_inference.models.common.transformer import Decoder
from vla_inference.models.common.vit import VisionTower
from vla_inference.models.common.weights import NameMap
from vla_inference.models.pi0.checkpoint import EMBED_ALIAS, openpi_names
from vla_inference.models.pi0.model import (
    GEMMA_VARIANTS,
    SIGLIP_VARIANTS,
    SIZES,
    Pi0Batch,
    Pi0Model,
    build,
)

_VISION = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
_LM = "paligemma_with_expert.paligemma.model.language_model."
_EXPERT = "paligemma_with_expert.gemma_expert.model."


def _part(prefix_ours: str, prefix_theirs: str) -> NameMap:
    """The openpi map restricted to one submodule: names below `prefix_ours`, keys below `prefix_theirs`."""
    full = openpi_names(EMBED_ALIAS)  # the embedding under its transformers name

    def sources(name: str, shape: tuple[int, ...]) -> list:  # type: ignore[type-arg]
        found = full.sources(prefix_ours + name, shape)
        assert all(s.key.startswith(prefix_theirs) for s in found), found
        return [replace(s, key=s.key.removeprefix(prefix_theirs)) for s in found]

    return NameMap(sources)


@pytest.mark.parametrize("variant", ["tiny", "tiny14"])
def test_siglip_tower_matches_transformers(variant: str) -> None:
    cfg = SIGLIP_VARIANTS[variant]
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=cfg.norm_eps,
        vision_use_head=False,
    )
    reference = transformers.SiglipVisionModel(hf_cfg).eval()
    randomise(reference, 0)
    ours = VisionTower(cfg).eval()
    # openpi's ".../vision_tower.vision_model.*" names are transformers 4.53's; transformers 5's
    # SiglipVisionModel state dict starts below "vision_model."
    copy_from_reference(ours, _part("vision.", _VISION), reference.state_dict())
    images = (
        torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    )
    with torch.no_grad():
        expected = reference(pixel_values=images).last_hidden_state
        got = ours(images)
    assert got.shape == (2, cfg.num_patches, cfg.width)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _hf_gemma(name: str, vocab: int, seed: int = 2, mlp_dim: int | None = None) -> torch.nn.Module:
    cfg = GEMMA_VARIANTS[name]
    hf_cfg = transformers.GemmaConfig(
        vocab_size=vocab,
        hidden_size=cfg.width,
        intermediate_size=mlp_dim or cfg.mlp_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=512,
    )
    reference = transformers.GemmaModel(hf_cfg).eval()
    randomise(reference, seed)
    return reference


@pytest.mark.parametrize("name", ["dummy", "demo"])
def test_gemma_decoder_matches_transformers(name: str) -> None:
    """The shared Decoder in Gemma's configuration, alone and causal, equals transformers' GemmaModel
    (and so does pi0's joint attention with only the VLM)."""
    cfg = SIZES["pi0_dummy"] if name == "dummy" else SIZES["pi0_demo"]
    model: Pi0Model = build(cfg).eval()
    reference = _hf_gemma(name, cfg.vocab_size)
    copy_from_reference(model.vlm, _part("vlm.", _LM), reference.state_dict())
    B, T = 2, 17
    embeds = torch.randn(B, T, cfg.vlm.width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(inputs_embeds=embeds).last_hidden_state
        # transformers 5 scales token embeddings inside embed_tokens, not inputs_embeds: same input here
        causal = block_causal_mask(torch.ones(B, T, dtype=torch.int32), torch.ones(B, T, dtype=torch.bool))
        positions = torch.arange(T)[None].expand(B, T)
        (joint,) = model.joint_forward([embeds], causal, positions, [None])
        alone = model.vlm(embeds, positions, causal[:, None])
    torch.testing.assert_close(joint, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, expected, atol=1e-5, rtol=1e-5)


def test_token_embedding_scaling_matches_gemma() -> None:
    """Language tokens enter the LM as embed(token) * sqrt(width), as Gemma's scaled embedding does."""
    cfg = SIZES["pi0_dummy"]
    model: Pi0Model = build(cfg).eval()
    reference = _hf_gemma("dummy", cfg.vocab_size)
    model.vlm.embed_tokens.weight.data.copy_(reference.embed_tokens.weight.data)
    tokens = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    images = torch.zeros(1, 3, 3, 224, 224)
    batch = Pi0Batch(
        images, torch.zeros(1, 3, dtype=torch.bool), tokens, torch.ones(1, 9, dtype=torch.bool), None
    )
    embs, pad = model.embed_prefix(batch, present_slots(batch.image_masks))
    expected = reference.embed_tokens(tokens)  # GemmaTextScaledWordEmbedding: weight[token] * sqrt(width)
    assert reference.embed_tokens.scalar_embed_scale == pytest.approx(cfg.vlm.width**0.5)
    torch.testing.assert_close(embs[:, -9:], expected)
    assert pad.tolist()[0] == [True] * 9  # image slots masked in the whole batch add no tokens


def test_joint_attention_of_two_experts_matches_openpi_layer_recipe() -> None:
    """pi0's mixture: VLM (prefix) and action expert (suffix) with separate weights and different widths
    attend jointly, layer by layer, under the prefix-LM / block-causal mask.

    The reference follows openpi's PaliGemmaWithExpertModel.compute_layer_complete step by step with
    transformers' Gemma modules: per expert input_layernorm and q/k/v projections, concatenation,
    GemmaRotaryEmbedding + apply_rotary_pos_emb, eager attention with the additive mask
    (0 / -2.3819763e38), split back, per expert o_proj, residual, post_attention_layernorm, MLP,
    residual; final norms. Only valid tokens are compared (openpi's padding rows attend uniformly).
    """
    cfg = SIZES["pi0_dummy"]
    model: Pi0Model = build(cfg).eval()
    vlm_ref = _hf_gemma("dummy", cfg.vocab_size)
    # an expert of another MLP width: the experts share only the attention layout
    model.expert = Decoder(replace(cfg.expert, mlp_dim=96)).eval()
    expert_ref = _hf_gemma("dummy", 8, seed=7, mlp_dim=96)
    copy_from_reference(model.vlm, _part("vlm.", _LM), vlm_ref.state_dict())
    copy_from_reference(model.expert, _part("expert.", _EXPERT), expert_ref.state_dict())

    g = torch.Generator().manual_seed(8)
    B, P, S = 2, 11, 6
    prefix = torch.randn(B, P, 64, generator=g)
    suffix = torch.randn(B, S, 64, generator=g)
    prefix_pad = torch.ones(B, P, dtype=torch.bool)
    prefix_pad[0, 7:] = False  # sample 0 has 4 padding tokens
    pad = torch.cat([prefix_pad, torch.ones(B, S, dtype=torch.bool)], dim=1)
    ar = torch.tensor([[0] * P + [1, 1] + [0] * (S - 2)] * B, dtype=torch.int32)  # pi0: state | actions
    positions = torch.cumsum(pad.long(), dim=1) - 1

    # openpi's mask (make_att_2d_masks) without our padding self-attention, as an additive mask
    cumsum = torch.cumsum(ar, dim=1)
    allowed = (cumsum[:, None, :] <= cumsum[:, :, None]) & pad[:, None, :] & pad[:, :, None]
    additive = torch.where(allowed[:, None], 0.0, -2.3819763e38)

    with torch.no_grad():
        ours = model.joint_forward([prefix, suffix], block_causal_mask(ar, pad), positions, [None, None])

        stacks = [vlm_ref, expert_ref]
        xs = [prefix, suffix]
        for li in range(cfg.vlm.depth):
            layers = [stack.layers[li] for stack in stacks]
            qs, ks, vs = [], [], []
            for layer, x in zip(layers, xs, strict=True):
                h = layer.input_layernorm(x)
                shape = (*h.shape[:-1], -1, layer.self_attn.head_dim)
                qs.append(layer.self_attn.q_proj(h).view(shape).transpose(1, 2))
                ks.append(layer.self_attn.k_proj(h).view(shape).transpose(1, 2))
                vs.append(layer.self_attn.v_proj(h).view(shape).transpose(1, 2))
            q, k, v = torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2)
            cos, sin = vlm_ref.rotary_emb(q.new_zeros(B, P + S, 16), positions)
            q, k = modeling_gemma.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
            attn_module = layers[0].self_attn
            out, _ = modeling_gemma.eager_attention_forward(
                attn_module, q, k, v, additive, attn_module.scaling
            )
            out = out.reshape(B, P + S, -1)
            new_xs, start = [], 0
            for layer, x in zip(layers, xs, strict=True):
                part = layer.self_attn.o_proj(out[:, start : start + x.shape[1]])
                start += x.shape[1]
                x = x + part
                x = x + layer.mlp(layer.post_attention_layernorm(x))
                new_xs.append(x)
            xs = new_xs
        expected = [stack.norm(x) for stack, x in zip(stacks, xs, strict=True)]

    valid = prefix_pad
    torch.testing.assert_close(ours[0][valid], expected[0][valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], expected[1], atol=1e-5, rtol=1e-5)


def test_pi05_adaptive_norm_and_time_mlp_match_openpi_formulas() -> None:
    """pi0.5's action expert, written out from openpi (models_pytorch/pi0_pytorch.py embed_suffix,
    the adaRMS GemmaRMSNorm and _gated_residual of its patched Gemma), with the tensors read back
    through the openpi names:

        time_emb = [sin(2π t / p), cos(2π t / p)], p = 4e-3 * (4 / 4e-3) ** linspace(0, 1, W / 2)
        cond     = silu(time_mlp_out(silu(time_mlp_in(time_emb))))
        norm(x)  = rms(x) * (1 + scale) + shift, (scale, shift, gate) = dense(cond).chunk(3)
        layer    h = x + o_proj(attn(norm1(x))) * gate1;  out = h + mlp(norm2(h)) * gate2
        final    rms(x) * (1 + scale) + shift of the final norm; actions = action_out_proj(final)

    The suffix attends to itself only here (no prefix): the expert alone, one bidirectional block.
    """
    cfg = SIZES["pi05_dummy"]
    model: Pi0Model = build(cfg).eval()
    randomise(model, 11)
    w = openpi_names().to_checkpoint(model.state_dict())
    E = _EXPERT
    B, H, W = 2, cfg.action_horizon, cfg.expert.width
    g = torch.Generator().manual_seed(12)
    x_t = torch.randn(B, H, cfg.action_dim, generator=g)
    t = torch.tensor([0.9, 0.35])

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    def ada(name: str, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift, gate = linear(name + ".dense", cond)[:, None].chunk(3, dim=-1)
        rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return rms * (1 + scale) + shift, gate

    fraction = torch.linspace(0, 1, W // 2, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    angle = t.double()[:, None] * 2 * math.pi / period
    time_emb = torch.cat([angle.sin(), angle.cos()], -1).float()
    cond = F.silu(linear("time_mlp_out", F.silu(linear("time_mlp_in", time_emb))))

    x = linear("action_in_proj", x_t)
    positions = torch.arange(H)[None].expand(B, H)
    rotary = transformers.models.gemma.modeling_gemma.GemmaRotaryEmbedding(
        transformers.GemmaConfig(head_dim=cfg.expert.head_dim, rope_theta=cfg.expert.rope_theta)
    )
    cos, sin = rotary(x, positions)
    D = cfg.expert.head_dim
    for li in range(cfg.expert.depth):
        p = f"{E}layers.{li}."
        h, gate1 = ada(p + "input_layernorm", x, cond)
        q, k, v = (linear(p + f"self_attn.{n}_proj", h).view(B, H, -1, D).transpose(1, 2) for n in "qkv")
        q, k = modeling_gemma.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        k, v = k.expand(-1, q.shape[1], -1, -1), v.expand(-1, q.shape[1], -1, -1)  # one kv head
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v
        x = x + linear(p + "self_attn.o_proj", attn.transpose(1, 2).reshape(B, H, -1)) * gate1
        h, gate2 = ada(p + "post_attention_layernorm", x, cond)
        mlp = linear(
            p + "mlp.down_proj",
            F.gelu(linear(p + "mlp.gate_proj", h), approximate="tanh") * linear(p + "mlp.up_proj", h),
        )
        x = x + mlp * gate2
    final, _ = ada(E + "norm", x, cond)
    expected = linear("action_out_proj", final)

    with torch.no_grad():
        suffix, our_cond = model.embed_suffix(torch.zeros(B, cfg.action_dim), x_t, t)
        assert our_cond is not None
        torch.testing.assert_close(our_cond, cond, atol=1e-6, rtol=1e-5)
        mask = torch.ones(B, H, H, dtype=torch.bool)
        (out,) = model.joint_forward.__func__(  # type: ignore[attr-defined]
            _ExpertOnly(model), [suffix], mask, positions, [our_cond]
        )
        got = model.action_out_proj(out)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


class _ExpertOnly(torch.nn.Module):
    """Pi0Model's joint_forward over the expert stack alone (its first stack is the VLM)."""

    def __init__(self, model: Pi0Model) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.vlm = model.expert
        self.expert = model.expert
