"""OpenVLA's modules against independent implementations, tiny random weights, fp32.

Proves, for the shared ViT tower in each timm convention Prismatic's towers use: DINOv2 with
registers (class token outside the position embedding) equals transformers'
Dinov2WithRegistersModel, DINOv2 without registers (class token position-embedded) and with the
packed SwiGLU MLP of ViT-g equal transformers' Dinov2Model, SigLIP (exact GELU, as timm builds it)
equals SiglipVisionModel: each the hidden state after the second-to-last layer, prefix tokens
dropped. The shared decoder in Llama's configuration equals LlamaForCausalLM (full, GQA, left
padded; weights through the checkpoint name map), our KV-cached greedy decoding equals
transformers' generate(), and the projector and the place of the patch embeddings in the sequence
equal Prismatic's formulas written out here.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tests.helpers.openvla_checkpoints import init_weights, tiny_model
from tests.helpers.reference import copy_from_reference
from vla_inference.models.common.transformer import DecoderConfig
from vla_inference.models.common.vit import VisionTower, ViTConfig
from vla_inference.models.openvla.checkpoint import openvla_names
from vla_inference.models.openvla.model import OpenVLA, OpenVLAConfig

TINY = OpenVLAConfig.named("tiny")
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _pixels(batch: int = 2, size: int = 28) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


def _hf_blocks(
    sd: dict[str, torch.Tensor], cfg: ViTConfig, layer: str, names: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Our blocks in an HF ViT's names: `layer` is the per-layer prefix, `names` our module -> theirs."""
    out = {}
    for i in range(cfg.blocks_built):
        a, b = f"blocks.{i}.", layer.format(i)
        for name, w in zip(("q_proj", "k_proj", "v_proj"), sd[a + "attn.qkv.weight"].chunk(3), strict=True):
            out[b + names["attn"] + f".{name}.weight"] = w
        for name, bias in zip(("q_proj", "k_proj", "v_proj"), sd[a + "attn.qkv.bias"].chunk(3), strict=True):
            out[b + names["attn"] + f".{name}.bias"] = bias
        for ours, theirs in names.items():
            if ours in ("attn", "ls1", "ls2"):
                continue
            for leaf in ("weight", "bias"):
                if a + f"{ours}.{leaf}" in sd:
                    out[b + f"{theirs}.{leaf}"] = sd[a + f"{ours}.{leaf}"]
        for ls in ("ls1", "ls2"):
            if ls in names:
                out[b + names[ls]] = sd[a + ls]
    return out


_DINO_NAMES = {
    "attn": "attention",
    "attn.proj": "attention.o_proj",
    "norm1": "norm1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "ls1": "layer_scale1.lambda1",
    "ls2": "layer_scale2.lambda1",
}


def _dinov2_case(registers: bool, swiglu: bool) -> tuple[ViTConfig, torch.nn.Module]:
    """A tiny DINOv2 tower in the timm convention and the transformers model of the same shape."""
    base = TINY.dino
    hidden = (int(base.width * 4 * 2 / 3) + 7) // 8 * 8 * 2 if swiglu else base.mlp_dim  # HF's SwiGLU sizing
    cfg = replace(
        base,
        reg_tokens=4 if registers else 0,
        pos_embed_prefix=not registers,
        act="swiglu" if swiglu else "gelu",
        mlp_dim=hidden,
    )
    common = dict(
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        mlp_ratio=4 if swiglu else cfg.mlp_dim // cfg.width,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        layer_norm_eps=cfg.norm_eps,
        hidden_act="gelu",
        qkv_bias=True,
    )
    if registers:
        return cfg, Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(num_register_tokens=4, **common)
        ).eval()
    return cfg, Dinov2Model(Dinov2Config(use_swiglu_ffn=swiglu, **common)).eval()


@pytest.mark.parametrize(
    ("registers", "swiglu"),
    [(True, False), (False, False), (False, True)],
    ids=["reg4", "no-reg", "giant-swiglu"],
)
def test_dinov2_towers_match_transformers(registers: bool, swiglu: bool) -> None:
    cfg, hf = _dinov2_case(registers, swiglu)
    ours = VisionTower(cfg).eval()
    init_weights(ours, seed=1)
    sd = ours.state_dict()
    names = dict(_DINO_NAMES)
    if swiglu:  # timm packs [gate | up] in fc1 (silu on the first half); transformers splits them
        names |= {"mlp.fc2": "mlp.down_proj"}
        del names["mlp.fc1"]
    mapped = dict(hf.state_dict())  # the last layer (never run by ours) keeps HF's own weights
    mapped |= _hf_blocks(sd, cfg, "encoder.layer.{}.", names)
    if swiglu:
        for i in range(cfg.blocks_built):
            for leaf in ("weight", "bias"):
                gate, up = sd[f"blocks.{i}.mlp.fc1.{leaf}"].chunk(2)
                mapped[f"encoder.layer.{i}.mlp.gate_proj.{leaf}"] = gate
                mapped[f"encoder.layer.{i}.mlp.up_proj.{leaf}"] = up
    mapped["embeddings.cls_token"] = sd["cls_token"][None]
    mapped["embeddings.patch_embeddings.projection.weight"] = sd["patch_embed.weight"]
    mapped["embeddings.patch_embeddings.projection.bias"] = sd["patch_embed.bias"]
    if registers:
        mapped["embeddings.register_tokens"] = sd["reg_tokens"][None]
        # timm no_embed_class: the class token gets no position embedding -> HF's class slot = 0
        mapped["embeddings.position_embeddings"] = torch.cat([torch.zeros(1, cfg.width), sd["pos_embed"]])[
            None
        ]
    else:
        mapped["embeddings.position_embeddings"] = sd["pos_embed"][None]  # class slot included
    hf.load_state_dict(mapped, strict=True)
    pixels = _pixels()
    with torch.no_grad():
        expected = hf(pixels, output_hidden_states=True).hidden_states[cfg.depth - 1][
            :, cfg.num_prefix_tokens :
        ]
        got = ours(pixels)
    assert got.shape == (2, cfg.num_patches, cfg.width)
    torch.testing.assert_close(got, expected, **TOL)


def test_siglip_tower_matches_transformers() -> None:
    cfg = TINY.siglip
    ours = VisionTower(cfg).eval()
    init_weights(ours, seed=2)
    hf = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=cfg.width,
            intermediate_size=cfg.mlp_dim,
            num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.num_heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_act="gelu",  # timm builds SigLIP with exact GELU; OpenVLA was trained so
            layer_norm_eps=cfg.norm_eps,
        )
    ).eval()
    sd = ours.state_dict()
    names = {
        "attn": "self_attn",
        "attn.proj": "self_attn.out_proj",
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
    }
    names |= {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    mapped = dict(hf.state_dict())  # the head (attention pool) and the last layer are not compared
    mapped |= _hf_blocks(sd, cfg, "encoder.layers.{}.", names)
    mapped["embeddings.patch_embedding.weight"] = sd["patch_embed.weight"]
    mapped["embeddings.patch_embedding.bias"] = sd["patch_embed.bias"]
    mapped["embeddings.position_embedding.weight"] = sd["pos_embed"]
    hf.load_state_dict(mapped, strict=True)
    pixels = _pixels()
    with torch.no_grad():
        expected = hf(pixels, output_hidden_states=True).hidden_states[cfg.depth - 1]
        got = ours(pixels)
    assert got.shape == (2, cfg.num_patches, cfg.width)
    torch.testing.assert_close(got, expected, **TOL)


def hf_llama_config(cfg: OpenVLAConfig, **extra: Any) -> transformers.LlamaConfig:
    """transformers' LlamaConfig of an OpenVLA config's language model, eager attention."""
    llm = cfg.llm
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=llm.width,
        intermediate_size=llm.mlp_dim,
        num_hidden_layers=llm.depth,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        rms_norm_eps=llm.norm_eps,
        rope_theta=llm.rope_theta,
        max_position_embeddings=cfg.max_seq_len,
        attn_implementation="eager",
        **extra,
    )


def _llama_pair(kv_heads: int, seed: int) -> tuple[OpenVLA, transformers.LlamaForCausalLM]:
    llm = DecoderConfig(width=64, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=kv_heads, head_dim=16)
    cfg = replace(TINY, llm=llm, vocab_size=320)
    ours = OpenVLA(cfg).eval()
    init_weights(ours, seed=seed)
    hf = transformers.LlamaForCausalLM(hf_llama_config(cfg, tie_word_embeddings=False)).eval()
    torch.manual_seed(seed)
    for p in hf.parameters():  # random norms too, so a mis-wired weight shows
        torch.nn.init.normal_(p, std=0.2 if p.ndim == 1 else 1 / math.sqrt(p.shape[-1]))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.add_(1.0)
    reference = {"language_model." + k: v for k, v in hf.state_dict().items()}
    copy_from_reference(ours.llm, _under(openvla_names(cfg), "llm."), reference)
    ours.lm_head.weight.data.copy_(reference["language_model.lm_head.weight"])
    return ours, hf


def _under(names, prefix):  # type: ignore[no-untyped-def]
    from vla_inference.models.common.weights import NameMap

    return NameMap(lambda name, shape: names.sources(prefix + name, shape))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_matches_transformers_full_and_left_padded(kv_heads: int) -> None:
    ours, hf = _llama_pair(kv_heads, seed=3)
    g = torch.Generator().manual_seed(4)
    embeds = torch.randn(2, 9, 64, generator=g)
    pad = torch.tensor([0, 3])  # sample 1 is left-padded by 3
    col = torch.arange(9)
    valid = col[None] >= pad[:, None]
    positions = (col[None] - pad[:, None]).clamp(min=0)
    mask = (col[:, None] >= col[None, :])[None] & valid[:, None, :]
    mask = mask | torch.eye(9, dtype=torch.bool)[None]
    with torch.no_grad():
        got = ours.lm_head(ours.llm(embeds, positions, mask[:, None]))
        expected = hf(inputs_embeds=embeds, attention_mask=valid.long(), position_ids=positions).logits
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], **TOL)  # real tokens only
    with torch.no_grad():
        alone = hf(inputs_embeds=embeds[1:, 3:]).logits
    torch.testing.assert_close(got[1, 3:], alone[0], **TOL)


def test_greedy_decoding_matches_transformers_generate() -> None:
    cfg = replace(TINY, llm=replace(TINY.llm, num_kv_heads=2))
    model = tiny_model(seed=5, cfg=cfg).eval()  # lm_head steered into the action tokens
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.llm.width,
            intermediate_size=cfg.llm.mlp_dim,
            num_hidden_layers=cfg.llm.depth,
            num_attention_heads=cfg.llm.num_heads,
            num_key_value_heads=cfg.llm.num_kv_heads,
            rms_norm_eps=cfg.llm.norm_eps,
            tie_word_embeddings=False,
        )
    ).eval()
    hf.load_state_dict(
        {
            k.removeprefix("language_model."): v
            for k, v in openvla_names(cfg).to_checkpoint(model.state_dict()).items()
            if k.startswith("language_model.")
        },
        strict=True,
    )
    g = torch.Generator().manual_seed(6)
    pixels = torch.randn(1, 6, 28, 28, generator=g)
    prompt = torch.tensor([1, 512, 300, 77, 13, 29871])
    ours = model.generate(pixels, [prompt], max_new_tokens=7)
    with torch.no_grad():
        embeds, _ = model.embed(model.layout(pixels, [prompt]))  # one prompt: no padding
        out = hf.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=7,
            do_sample=False,
            pad_token_id=cfg.pad_token_id,
            eos_token_id=None,
        )
    assert out[0, -7:].tolist() == ours.tokens[0].tolist()


def test_projector_and_patch_positions_follow_prismatic() -> None:
    """Prismatic (modeling_prismatic.py): the fused projector is fc1 -> GELU -> fc2 -> GELU -> fc3 over
    the per-patch concatenation [DINOv2 features | SigLIP features], and the projected patches are
    spliced in right after BOS: [BOS, patches, rest of the prompt]. Written out here with F.linear on
    the checkpoint's tensors; the two towers' features come from the (separately checked) towers."""
    cfg = TINY
    model = tiny_model(seed=8).eval()
    w = openvla_names(cfg).to_checkpoint(model.state_dict())
    g = torch.Generator().manual_seed(9)
    pixels = torch.randn(2, 6, 28, 28, generator=g)
    prompts = [torch.tensor([1, 40, 41, 42, 29871]), torch.tensor([1, 50, 29871])]
    with torch.no_grad():
        features = torch.cat([model.dino(pixels[:, :3]), model.siglip(pixels[:, 3:])], dim=2)  # (B, N, 80)
        h = F.gelu(F.linear(features, w["projector.fc1.weight"], w["projector.fc1.bias"]))
        h = F.gelu(F.linear(h, w["projector.fc2.weight"], w["projector.fc2.bias"]))
        patches = F.linear(h, w["projector.fc3.weight"], w["projector.fc3.bias"])
        table = w["language_model.model.embed_tokens.weight"]
        rows = [torch.cat([table[p[:1]], patches[i], table[p[1:]]]) for i, p in enumerate(prompts)]
        embeds, valid = model.embed(model.layout(pixels, prompts))
    # [BOS, patches, padding, text]: the shorter prompt's padding sits between its patches and its text
    n = cfg.num_patches
    assert embeds.shape == (2, 1 + n + 4, cfg.llm.width)
    assert valid.tolist() == [[True] * (1 + n + 4), [True] * (1 + n) + [False, False, True, True]]
    torch.testing.assert_close(embeds[0], rows[0], **TOL)
    torch.testing.assert_close(embeds[1, valid[1]], rows[1], **TOL)
