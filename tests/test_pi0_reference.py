"""Numerical agreement with transformers' reference implementations, on tiny random weights (fp32).

openpi's PyTorch pi0 is built from transformers' SigLIP and Gemma modules, so these are the
reference: our SigLIP tower vs SiglipVisionModel, our Gemma stack (one expert alone, causal mask)
vs GemmaModel. Weights are copied through checkpoint.openpi_name, so the tests also check that the
name mapping puts every tensor where the reference expects it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vla_inference.models.pi0.checkpoint import openpi_name
from vla_inference.models.pi0.model import (
    GEMMA_VARIANTS,
    NAMED_CONFIGS,
    SIGLIP_VARIANTS,
    GemmaStack,
    Pi0Model,
    SiglipTower,
    block_causal_mask,
    build,
)

transformers = pytest.importorskip("transformers")

_VISION_PREFIX = "paligemma_with_expert.paligemma.model.vision_tower."
_LM_PREFIX = "paligemma_with_expert.paligemma.model.language_model."


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(
                torch.randn(p.shape, generator=g) * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.1)
            )


def _copy_into_ours(
    ours: torch.nn.Module, ours_prefix: str, reference: torch.nn.Module, ref_prefix: str
) -> None:
    ref_sd = reference.state_dict()
    loaded = {}
    for name in ours.state_dict():
        key = openpi_name(ours_prefix + name)
        assert key.startswith(ref_prefix), key
        loaded[name] = ref_sd[key.removeprefix(ref_prefix)]
    ours.load_state_dict(loaded, strict=True)


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
    _randomise(reference, 0)
    ours = SiglipTower(cfg).eval()
    # our "vision.*" names map to openpi's ".../vision_tower.vision_model.*" (transformers 4.53 names);
    # transformers 5's SiglipVisionModel state dict starts below "vision_model."
    _copy_into_ours(ours, "vision.", reference, _VISION_PREFIX + "vision_model.")
    images = (
        torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    )
    with torch.no_grad():
        expected = reference(pixel_values=images).last_hidden_state
        got = ours(images)
    assert got.shape == (2, cfg.num_patches, cfg.width)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _hf_gemma(name: str, vocab: int) -> tuple[GemmaStack, torch.nn.Module]:
    cfg = GEMMA_VARIANTS[name]
    hf_cfg = transformers.GemmaConfig(
        vocab_size=vocab,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
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
    _randomise(reference, 2)
    return GemmaStack(cfg, cond_dim=None).eval(), reference


@pytest.mark.parametrize("name", ["dummy", "demo"])
def test_gemma_stack_matches_transformers(name: str) -> None:
    """The VLM path of our joint attention, alone and causal, equals transformers' GemmaModel."""
    cfg = NAMED_CONFIGS["pi0_dummy"] if name == "dummy" else NAMED_CONFIGS["pi0_demo"]
    model: Pi0Model = build(cfg).eval()
    _, reference = _hf_gemma(name, cfg.vocab_size)
    _copy_into_ours(model.vlm, "vlm.", reference, _LM_PREFIX)
    B, T = 2, 17
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(B, T, cfg.vlm.width, generator=g)
    with torch.no_grad():
        expected = reference(inputs_embeds=embeds).last_hidden_state
        # transformers 5 scales token embeddings inside embed_tokens, not inputs_embeds: same input here
        causal = block_causal_mask(torch.ones(B, T, dtype=torch.int32), torch.ones(B, T, dtype=torch.bool))
        positions = torch.arange(T)[None].expand(B, T)
        (got,) = model.joint_forward([embeds], causal, positions, [None])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_token_embedding_scaling_matches_gemma() -> None:
    """Language tokens enter the LM as embed(token) * sqrt(width), as Gemma's scaled embedding does."""
    cfg = NAMED_CONFIGS["pi0_dummy"]
    model: Pi0Model = build(cfg).eval()
    _, reference = _hf_gemma("dummy", cfg.vocab_size)
    model.embed_tokens.weight.data.copy_(reference.embed_tokens.weight.data)
    tokens = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    images = torch.zeros(1, 3, 3, 224, 224)
    embs, pad = model.embed_prefix(
        images, torch.zeros(1, 3, dtype=torch.bool), tokens, torch.ones(1, 9, dtype=torch.bool)
    )
    lang = embs[:, -9:]
    expected = reference.embed_tokens(tokens)  # GemmaTextScaledWordEmbedding: weight[token] * sqrt(width)
    assert reference.embed_tokens.scalar_embed_scale == pytest.approx(cfg.vlm.width**0.5)
    torch.testing.assert_close(lang, expected)
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
    from transformers.models.gemma import modeling_gemma

    cfg = NAMED_CONFIGS["pi0_dummy"]
    model: Pi0Model = build(cfg).eval()
    _, vlm_ref = _hf_gemma("dummy", cfg.vocab_size)
    expert_cfg = transformers.GemmaConfig(
        vocab_size=8,
        hidden_size=cfg.expert.width,
        intermediate_size=96,
        num_hidden_layers=cfg.expert.depth,
        num_attention_heads=cfg.expert.num_heads,
        num_key_value_heads=1,
        head_dim=cfg.expert.head_dim,
        hidden_activation="gelu_pytorch_tanh",
        rope_theta=cfg.expert.rope_theta,
    )
    # an expert of another MLP width: the experts share only the attention layout
    model.expert = GemmaStack(replace(cfg.expert, mlp_dim=96), cond_dim=None).eval()
    expert_ref = transformers.GemmaModel(expert_cfg).eval()
    _randomise(expert_ref, 7)
    _copy_into_ours(model.vlm, "vlm.", vlm_ref, _LM_PREFIX)
    _copy_into_ours(model.expert, "expert.", expert_ref, "paligemma_with_expert.gemma_expert.model.")

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
        rotary = vlm_ref.rotary_emb
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
            cos, sin = rotary(q.new_zeros(B, P + S, 16), positions)
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
