"""The published pi0 / pi0.5 layouts, on the meta device (no memory, no weights).

Fixture, derived independently of our model code the way openpi's PI0Pytorch builds its model
(models_pytorch/gemma_pytorch.py, pi0_pytorch.py) and saves it (safetensors.torch.save_model in
examples/convert_jax_model_to_pytorch.py):

1. transformers' PaliGemmaForConditionalGeneration with openpi's overrides (vocab 257152; text
   gemma_2b: width 2048, depth 18, mlp 16384, 8 heads, 1 kv head, head dim 256; vision
   intermediate 4304, projection 2048), names prefixed "paligemma_with_expert.paligemma.";
2. transformers' GemmaForCausalLM with gemma_300m (width 1024, mlp 4096, same attention layout),
   prefixed "paligemma_with_expert.gemma_expert.", without "model.embed_tokens.weight" (openpi sets
   embed_tokens = None); its lm_head stays (saved, never used); for pi0.5 every expert RMSNorm weight
   is replaced by adaRMSNorm's "dense" Linear(1024, 3 * 1024) (weight + bias), as openpi's patched
   GemmaRMSNorm does when cond_dim is set;
3. the PaliGemma LM head is tied to the token embedding; save_model keeps one name per shared
   tensor, the lexicographically first: "paligemma.lm_head.weight" stays, ".embed_tokens.weight" goes;
4. the heads: action_in_proj / action_out_proj (32 <-> 1024), pi0: state_proj, action_time_mlp_in
   (2048 -> 1024), action_time_mlp_out; pi0.5: time_mlp_in, time_mlp_out (1024 -> 1024);
5. transformers 5 names SiglipVisionModel's weights without the "vision_model." level that
   transformers 4.53 (openpi's pinned version, and so its checkpoints) has: it is put back.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.helpers.reference import checkpoint_shapes
from vla_inference.models.pi0 import checkpoint as ckpt
from vla_inference.models.pi0.model import SIZES, build

PG = "paligemma_with_expert.paligemma."
EX = "paligemma_with_expert.gemma_expert."


@pytest.fixture(scope="module")
def paligemma_layout() -> dict[str, tuple[int, ...]]:
    cfg = transformers.PaliGemmaConfig()
    cfg.text_config.vocab_size = 257152
    cfg.text_config.hidden_size = 2048
    cfg.text_config.intermediate_size = 16384
    cfg.text_config.num_attention_heads = 8
    cfg.text_config.num_key_value_heads = 1
    cfg.text_config.head_dim = 256
    cfg.text_config.num_hidden_layers = 18
    cfg.vision_config.intermediate_size = 4304
    cfg.vision_config.projection_dim = 2048
    with torch.device("meta"):
        model = transformers.PaliGemmaForConditionalGeneration(cfg)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied
    layout = {}
    for name, tensor in model.state_dict().items():
        if name == "model.language_model.embed_tokens.weight":
            continue  # tied to lm_head.weight; save_model keeps "lm_head.weight" (sorts first)
        name = name.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)
        layout[PG + name] = tuple(tensor.shape)
    return layout


def expert_layout(pi05: bool) -> dict[str, tuple[int, ...]]:
    cfg = transformers.GemmaConfig(
        vocab_size=257152,
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        num_hidden_layers=18,
    )
    with torch.device("meta"):
        model = transformers.GemmaForCausalLM(cfg)
    layout = {}
    for name, tensor in model.state_dict().items():
        if name == "model.embed_tokens.weight":
            continue  # openpi: gemma_expert.model.embed_tokens = None
        if pi05 and (name.endswith("layernorm.weight") or name == "model.norm.weight"):
            base = name.removesuffix(".weight")
            layout[EX + base + ".dense.weight"] = (3 * 1024, 1024)
            layout[EX + base + ".dense.bias"] = (3 * 1024,)
            continue
        layout[EX + name] = tuple(tensor.shape)
    return layout


def heads_layout(pi05: bool) -> dict[str, tuple[int, ...]]:
    def linear(name: str, n_in: int, n_out: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}

    layout = {**linear("action_in_proj", 32, 1024), **linear("action_out_proj", 1024, 32)}
    if pi05:
        layout |= linear("time_mlp_in", 1024, 1024) | linear("time_mlp_out", 1024, 1024)
    else:
        layout |= linear("state_proj", 32, 1024)
        layout |= linear("action_time_mlp_in", 2048, 1024) | linear("action_time_mlp_out", 1024, 1024)
    return layout


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_openpi_layout_matches_published(paligemma_layout: dict[str, tuple[int, ...]], variant: str) -> None:
    pi05 = variant == "pi05"
    expected = {**paligemma_layout, **expert_layout(pi05), **heads_layout(pi05)}
    model = build(SIZES[variant], device="meta")
    names = ckpt.openpi_names()
    ours = checkpoint_shapes(names, model)  # what the loader reads, in the file's names
    # the one saved tensor we do not model: the expert's unused LM head, skipped on load
    skipped = {k: expected.pop(k) for k in list(expected) if names.unused(k)}
    assert skipped == {EX + "lm_head.weight": (257152, 1024)}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    mismatched = {k: (ours[k], expected[k]) for k in ours if ours[k] != expected[k]}
    assert mismatched == {}


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_parameter_counts(variant: str) -> None:
    model = build(SIZES[variant], device="meta")

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    expert = count(model.expert)
    vlm = count(model.vlm)  # with its token embedding
    vision = count(model.vision) + count(model.projector)
    total = count(model)
    if variant == "pi0":
        assert 310e6 < expert < 312e6  # "gemma_300m: 311M params" (openpi gemma.py)
    else:
        # 311M without the 37 RMSNorm scales, plus 37 adaRMSNorm modulations of 1024 x 3072 + 3072
        assert 427e6 < expert < 429e6
    assert 2.50e9 < vlm < 2.52e9  # Gemma 2B with the 257152-token embedding
    assert 0.40e9 < vision < 0.42e9  # SigLIP So400m/14 + projector
    assert 3.2e9 < total < 3.4e9  # "3.3B" pi0
