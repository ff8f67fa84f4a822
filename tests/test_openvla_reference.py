"""Our OpenVLA modules against independent implementations in transformers, tiny random weights, fp32.

Proves: the DINOv2-with-registers tower (timm layout: fused qkv, LayerScale, class token
without position embedding, 4 registers) equals transformers' Dinov2WithRegistersModel hidden
state after the second-to-last layer, prefix tokens dropped; the SigLIP tower equals
SiglipVisionModel's (exact GELU, as timm builds it); our Llama-2 decoder equals
LlamaForCausalLM on full sequences, with GQA, with left padding + per-sample positions, and
our KV-cached greedy decoding equals transformers' generate() from the same prefix embeddings.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformers
from transformers import (
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vla_inference.models.openvla.model import (
    LlamaConfig,
    LlamaForCausalLM,
    OpenVLA,
    OpenVLAConfig,
    VisionTransformer,
    init_weights,
)

TINY = OpenVLAConfig.named("tiny")
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _pixels(batch: int = 2, size: int = 28) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


def test_dinov2_registers_tower_matches_transformers() -> None:
    cfg = TINY.dino
    assert cfg.mlp_hidden % cfg.width == 0  # HF's config takes an integer mlp_ratio
    ours = VisionTransformer(cfg).eval()
    init_weights(ours, seed=1)
    hf = Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(
            hidden_size=cfg.width,
            num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.heads,
            mlp_ratio=cfg.mlp_hidden // cfg.width,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            num_register_tokens=cfg.reg_tokens,
            layer_norm_eps=cfg.norm_eps,
            hidden_act="gelu",
            qkv_bias=True,
        )
    ).eval()
    sd = ours.state_dict()
    mapped = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.register_tokens": sd["reg_token"],
        # timm no_embed_class: the class token gets no position embedding -> HF's class slot = 0
        "embeddings.position_embeddings": torch.cat([torch.zeros(1, 1, cfg.width), sd["pos_embed"]], 1),
        "embeddings.mask_token": torch.zeros(1, cfg.width),
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for i in range(cfg.depth):
        a, b = f"blocks.{i}.", f"encoder.layer.{i}."
        q, k, v = sd[a + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[a + "attn.qkv.bias"].chunk(3)
        for name, w, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            mapped[b + f"attention.{name}.weight"], mapped[b + f"attention.{name}.bias"] = w, bias
        for src, dst in (("attn.proj", "attention.o_proj"), ("norm1", "norm1"), ("norm2", "norm2")):
            for leaf in ("weight", "bias"):
                mapped[f"{b}{dst}.{leaf}"] = sd[f"{a}{src}.{leaf}"]
        for src, dst in (("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for leaf in ("weight", "bias"):
                mapped[f"{b}{dst}.{leaf}"] = sd[f"{a}{src}.{leaf}"]
        mapped[b + "layer_scale1.lambda1"] = sd[a + "ls1.scale_factor"]
        mapped[b + "layer_scale2.lambda1"] = sd[a + "ls2.scale_factor"]
    hf.load_state_dict(mapped, strict=True)
    pixels = _pixels()
    with torch.no_grad():
        expected = hf(pixels, output_hidden_states=True).hidden_states[cfg.depth - 1][:, 1 + cfg.reg_tokens :]
        got = ours(pixels)
    assert got.shape == (2, cfg.num_patches, cfg.width)
    torch.testing.assert_close(got, expected, **TOL)


def test_siglip_tower_matches_transformers() -> None:
    cfg = TINY.siglip
    ours = VisionTransformer(cfg).eval()
    init_weights(ours, seed=2)
    hf = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=cfg.width,
            intermediate_size=cfg.mlp_hidden,
            num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_act="gelu",  # timm builds SigLIP with exact GELU; OpenVLA was trained so
            layer_norm_eps=cfg.norm_eps,
        )
    ).eval()
    sd = ours.state_dict()
    mapped = dict(hf.state_dict())  # the head (attention pool) is not compared
    mapped["embeddings.patch_embedding.weight"] = sd["patch_embed.proj.weight"]
    mapped["embeddings.patch_embedding.bias"] = sd["patch_embed.proj.bias"]
    mapped["embeddings.position_embedding.weight"] = sd["pos_embed"][0]
    for i in range(cfg.depth):
        a, b = f"blocks.{i}.", f"encoder.layers.{i}."
        q, k, v = sd[a + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[a + "attn.qkv.bias"].chunk(3)
        for name, w, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
            mapped[b + f"self_attn.{name}.weight"], mapped[b + f"self_attn.{name}.bias"] = w, bias
        for src, dst in (
            ("attn.proj", "self_attn.out_proj"),
            ("norm1", "layer_norm1"),
            ("norm2", "layer_norm2"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            for leaf in ("weight", "bias"):
                mapped[f"{b}{dst}.{leaf}"] = sd[f"{a}{src}.{leaf}"]
    hf.load_state_dict(mapped, strict=True)
    pixels = _pixels()
    with torch.no_grad():
        expected = hf(pixels, output_hidden_states=True).hidden_states[cfg.depth - 1]
        got = ours(pixels)
    assert got.shape == (2, cfg.num_patches, cfg.width)
    torch.testing.assert_close(got, expected, **TOL)


def _llama_pair(
    kv_heads: int, seed: int
) -> tuple[LlamaForCausalLM, transformers.LlamaForCausalLM, LlamaConfig]:
    cfg = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, intermediate=96)
    ours = LlamaForCausalLM(cfg).eval()
    init_weights(ours, seed=seed)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.dim,
            intermediate_size=cfg.intermediate,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            max_position_embeddings=cfg.max_seq_len,
            tie_word_embeddings=False,
            attn_implementation="eager",
        )
    ).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)  # same names: model.* and lm_head.weight
    return ours, hf, cfg


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_matches_transformers_full_and_left_padded(kv_heads: int) -> None:
    ours, hf, cfg = _llama_pair(kv_heads, seed=3)
    g = torch.Generator().manual_seed(4)
    embeds = torch.randn(2, 9, cfg.dim, generator=g)
    pad = torch.tensor([0, 3])  # sample 1 is left-padded by 3
    col = torch.arange(9)
    valid = col[None] >= pad[:, None]
    positions = (col[None] - pad[:, None]).clamp(min=0)
    mask = (col[:, None] >= col[None, :])[None] & valid[:, None, :]
    mask = mask | torch.eye(9, dtype=torch.bool)[None]
    with torch.no_grad():
        got = ours.lm_head(ours.model(embeds, positions, mask[:, None]))
        expected = hf(inputs_embeds=embeds, attention_mask=valid.long(), position_ids=positions).logits
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], **TOL)  # real tokens only
    with torch.no_grad():
        alone = hf(inputs_embeds=embeds[1:, 3:]).logits
    torch.testing.assert_close(got[1, 3:], alone[0], **TOL)


def test_greedy_decoding_matches_transformers_generate() -> None:
    cfg = replace(TINY, llm=replace(TINY.llm, n_kv_heads=2))
    model = OpenVLA(cfg).eval()
    init_weights(model, seed=5)
    with torch.no_grad():  # steer greedy decoding into the action tokens, as the tiny checkpoints do
        model.language_model.lm_head.weight[: cfg.action_vocab_size - 255] = 0.0
        model.language_model.lm_head.weight[cfg.action_vocab_size :] = 0.0
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=cfg.llm.vocab_size,
            hidden_size=cfg.llm.dim,
            intermediate_size=cfg.llm.intermediate,
            num_hidden_layers=cfg.llm.n_layers,
            num_attention_heads=cfg.llm.n_heads,
            num_key_value_heads=cfg.llm.n_kv_heads,
            rms_norm_eps=cfg.llm.norm_eps,
            tie_word_embeddings=False,
        )
    ).eval()
    hf.load_state_dict(model.language_model.state_dict(), strict=True)
    g = torch.Generator().manual_seed(6)
    pixels = torch.randn(1, 6, 28, 28, generator=g)
    prompt = torch.tensor([1, 512, 300, 77, 13, 29871])
    ours = model.generate(pixels, [prompt], max_new_tokens=7)
    with torch.no_grad():
        embeds, _ = model.embed_prefix(pixels, [prompt])
        out = hf.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=7,
            do_sample=False,
            pad_token_id=cfg.pad_token_id,
            eos_token_id=None,
        )
    assert out[0, -7:].tolist() == ours.tokens[0].tolist()
