"""The published pi0-FAST layout (lerobot/pi0fast-base, LeRobot policies/pi0_fast), on the meta device.

Fixture, derived independently of our model code the way LeRobot's PI0FastPaliGemma builds it:
transformers' PaliGemmaForConditionalGeneration with LeRobot's overrides (vocab 257152; text
gemma_2b: width 2048, depth 18, mlp 16384, 8 heads, 1 kv head, head dim 256; vision So400m with
intermediate 4304, projection 2048), named below "model.paligemma_with_expert.paligemma." (policy.model
.paligemma_with_expert.paligemma). LeRobot replaces the language model after transformers tied the LM
head, so its file holds lm_head.weight and embed_tokens.weight as two tensors: both are expected.
transformers 5 names the SigLIP weights without the "vision_model." level that LeRobot's files have:
it is put back.
"""

from __future__ import annotations

import torch
import transformers

from tests.helpers.reference import checkpoint_shapes
from vla_inference.models.pi0_fast import checkpoint as ckpt
from vla_inference.models.pi0_fast.model import SIZES, Pi0FastBatch, Pi0FastConfig, Rules, build
from vla_inference.models.pi0_fast.static import Pi0FastStatic


def published_layout() -> dict[str, tuple[int, ...]]:
    cfg = transformers.PaliGemmaConfig()
    text = cfg.text_config
    text.vocab_size = 257152
    text.hidden_size = 2048
    text.intermediate_size = 16384
    text.num_attention_heads = 8
    text.num_key_value_heads = 1
    text.head_dim = 256
    text.num_hidden_layers = 18
    cfg.vision_config.intermediate_size = 4304
    cfg.vision_config.projection_dim = 2048
    cfg.tie_word_embeddings = False  # as LeRobot's model ends up (see the module docstring)
    with torch.device("meta"):
        model = transformers.PaliGemmaForConditionalGeneration(cfg)
    layout = {}
    for name, tensor in model.state_dict().items():
        name = name.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)
        layout[ckpt.PREFIX + name] = tuple(tensor.shape)
    return layout


def test_real_size_matches_the_published_layout() -> None:
    expected = published_layout()
    model = build(SIZES["pi0fast_base"], device="meta")
    names = ckpt.lerobot_names()
    ours = checkpoint_shapes(names, model)
    # SigLIP's attention-pooling head: in LeRobot's files (its transformers builds it), never used;
    # transformers 5.24's PaliGemma does not build it
    skipped = {k for k in expected if names.unused(k)}
    assert all(".vision_model.head." in k for k in skipped)
    assert names.unused(ckpt.VISION + "head.attention.in_proj_weight")
    for key in skipped:
        expected.pop(key)
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: (ours[k], expected[k]) for k in ours if ours[k] != expected[k]} == {}
    assert ours[ckpt.LM_HEAD_KEY] == ours[ckpt.EMBED_KEY] == (257152, 2048)


def test_parameter_counts() -> None:
    model = build(SIZES["pi0fast_base"], device="meta")

    def count(module: torch.nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    assert 2.50e9 < count(model.vlm) < 2.52e9  # Gemma 2B with its 257152-token embedding
    assert 0.40e9 < count(model.vision) + count(model.projector) < 0.42e9  # SigLIP So400m/14 + projector
    assert count(model.lm_head) == 257152 * 2048
    tied = build(Pi0FastConfig.named("pi0fast_base", tied_lm_head=True), "meta")
    assert tied.lm_head is None and count(model) - count(tied) == 257152 * 2048
    assert 2.9e9 < count(tied) < 3.0e9  # PaliGemma 3B


def test_real_size_decodes_on_meta() -> None:
    """The published size through prefill and a sampled decode step on the meta device (shapes
    only): LeRobot's 3 cameras and 200-token prompt + the decode BOS, a budget of 256 tokens, the
    static runner's cache of a bucket of 8: 18 layers x 8 x 1 kv head x (969 + 255) x 256."""
    model = build(SIZES["pi0fast_base"], device="meta", dtype=torch.bfloat16)
    B, N, T = 2, 3, 201
    meta = {"device": "meta"}
    batch = Pi0FastBatch(
        torch.empty(B, N, 3, 224, 224, dtype=torch.bfloat16, **meta),
        torch.ones(B, N, dtype=torch.bool, **meta),
        torch.zeros(B, T, dtype=torch.long, **meta),
        torch.ones(B, T, dtype=torch.bool, **meta),
        torch.zeros(B, dtype=torch.long, **meta),
    )
    assert model.prefix_length(N, T) == 3 * 256 + 201 == 969
    cache = model.new_cache(B, 969 + 255)
    rules = Rules(stop_token=235371, pad_token=0, temperature=0.7)
    with torch.inference_mode():
        state = model.decode_step(cache, model.prefill(batch, cache, rules), rules)
    assert state.tokens.shape == (B, 256) and state.keys.shape == (B, 1224) and state.step.shape == (1,)
    runner = Pi0FastStatic(model, slots=3, prompt_len=201, budget=256, compile=False)
    assert runner.cache(8).k.shape == (18, 8, 1, 1224, 256)
