"""Our GR00T backbone blocks against the reference implementations in transformers (fp32, CPU).

Proves that, with the same random weights, our Qwen3 decoder equals transformers' Qwen3Model
(GQA, q/k RMSNorm, RoPE, causal + padding mask, final norm) and our vision tower equals
transformers' SiglipVisionModel. N1.5's Eagle 2.5 builds its vision tower as
SiglipVisionModel (config model_type "siglip_vision_model": fixed 224 grid, Conv2d patches,
learned positions) and loads SigLIP2-400M weights into it, so that is the reference here, not
transformers' Siglip2VisionModel (NaFlex patches) which N1.5 does not use.

Weights are random everywhere (norm gains included) so that a mis-wired weight shows.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vla_inference.models.groot.model import SIZES, Qwen3Model, SiglipVisionModel  # noqa: E402

TINY = SIZES["tiny"]


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) :] if name.startswith(prefix) else name


@pytest.mark.parametrize("layers", [1, 2])
def test_qwen3_matches_transformers(layers: int) -> None:
    hf_cfg = transformers.Qwen3Config(
        vocab_size=TINY.vocab_size,
        hidden_size=TINY.llm_hidden,
        intermediate_size=TINY.llm_intermediate,
        num_hidden_layers=layers,
        num_attention_heads=TINY.llm_heads,
        num_key_value_heads=TINY.llm_kv_heads,
        head_dim=TINY.llm_head_dim,
        rope_theta=TINY.rope_theta,
        rms_norm_eps=TINY.rms_eps,
        max_position_embeddings=128,
        attention_bias=False,
        attn_implementation="eager",
    )
    reference = transformers.Qwen3Model(hf_cfg).eval()
    _randomise(reference, seed=layers)
    ours = Qwen3Model(replace(TINY, select_layer=layers)).eval()
    ours.load_state_dict({_strip(k, "model."): v for k, v in reference.state_dict().items()}, strict=True)

    torch.manual_seed(0)
    embeds = torch.randn(2, 11, TINY.llm_hidden)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False  # right padding on the second row
    with torch.no_grad():
        expected = reference(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state
        got = ours(embeds, mask)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, :7], expected[1, :7], rtol=1e-5, atol=1e-5)
    # The padded row's real tokens equal the same prompt run alone (right padding is invisible).
    with torch.no_grad():
        alone = ours(embeds[1:2, :7], mask[1:2, :7])
    torch.testing.assert_close(got[1:2, :7], alone, rtol=1e-5, atol=1e-5)


def test_siglip_tower_matches_transformers() -> None:
    hf_cfg = transformers.SiglipVisionConfig(
        hidden_size=TINY.vit_hidden,
        intermediate_size=TINY.vit_intermediate,
        num_hidden_layers=TINY.vit_layers,
        num_attention_heads=TINY.vit_heads,
        image_size=TINY.image_size,
        patch_size=TINY.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=TINY.vit_eps,
        attn_implementation="eager",
    )
    reference = transformers.SiglipVisionModel(hf_cfg).eval()
    _randomise(reference, seed=5)
    ours = SiglipVisionModel(TINY).eval()
    state = {}
    for name, value in reference.state_dict().items():
        name = _strip(name, "vision_model.")
        if name.startswith("head."):  # pooling head: GR00T uses last_hidden_state only
            continue
        state["vision_model." + name] = value
    ours.load_state_dict(state, strict=True)

    torch.manual_seed(1)
    pixels = torch.randn(3, 3, TINY.image_size, TINY.image_size)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == (3, (TINY.image_size // TINY.patch_size) ** 2, TINY.vit_hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_eagle_backbone_matches_transformers_composition() -> None:
    """Vision tower -> mlp1 -> scatter into the <IMG_CONTEXT> rows -> Qwen3 (last_hidden_state),
    assembled from transformers modules, equals our EagleBackbone (two prompts, two images each
    for the first, one for the second, right-padded)."""
    from vla_inference.models.groot.model import EagleBackbone

    torch.manual_seed(3)
    ours = EagleBackbone(TINY).eval()
    _randomise(ours, seed=9)
    eagle = ours.eagle_model
    text = transformers.Qwen3Config(
        vocab_size=TINY.vocab_size,
        hidden_size=TINY.llm_hidden,
        intermediate_size=TINY.llm_intermediate,
        num_hidden_layers=TINY.select_layer,
        num_attention_heads=TINY.llm_heads,
        num_key_value_heads=TINY.llm_kv_heads,
        head_dim=TINY.llm_head_dim,
        rope_theta=TINY.rope_theta,
        rms_norm_eps=TINY.rms_eps,
        attn_implementation="eager",
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=TINY.vit_hidden,
        intermediate_size=TINY.vit_intermediate,
        num_hidden_layers=TINY.vit_layers,
        num_attention_heads=TINY.vit_heads,
        image_size=TINY.image_size,
        patch_size=TINY.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=TINY.vit_eps,
        attn_implementation="eager",
    )
    lm = transformers.Qwen3Model(text).eval()
    vit = transformers.SiglipVisionModel(vision).eval()
    lm.load_state_dict(eagle.language_model.model.state_dict(), strict=True)
    vit_state = {k.removeprefix("vision_model."): v for k, v in eagle.vision_model.state_dict().items()}
    missing, unexpected = vit.load_state_dict(
        {("vision_model." + k if hasattr(vit, "vision_model") else k): v for k, v in vit_state.items()},
        strict=False,
    )
    assert unexpected == [] and all("head" in m for m in missing)

    n_img = TINY.num_image_tokens
    img = TINY.image_token_id
    row0 = [1, 2, *([img] * n_img), 3, *([img] * n_img), 4, 5, 6]
    row1 = [7, *([img] * n_img), 8, 9]
    length = len(row0)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.bool)
    ids[0], mask[0] = torch.tensor(row0), True
    ids[1, : len(row1)], mask[1, : len(row1)] = torch.tensor(row1), True
    pixels = torch.randn(3, 3, TINY.image_size, TINY.image_size)

    with torch.no_grad():
        got = ours(pixels, ids, mask)
        feats = eagle.mlp1(vit(pixel_values=pixels).last_hidden_state)  # (3, T, D)
        embeds = lm.embed_tokens(ids).clone()
        embeds[ids == img] = feats.reshape(-1, TINY.llm_hidden)
        expected = lm(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, : len(row1)], expected[1, : len(row1)], rtol=1e-5, atol=1e-5)


def test_pixel_shuffle_matches_eagle_definition() -> None:
    """Eagle's pixel shuffle (scale 0.5) maps (N, W, H, C) to (N, W/2, H/2, 4C) with
    out[a, b] = [x[2a, 2b], x[2a, 2b+1], x[2a+1, 2b], x[2a+1, 2b+1]] (derived from its
    view / permute sequence). N1.5 does not use it ("nops"), other Eagle configs do."""
    from vla_inference.models.groot.model import EagleModel

    cfg = replace(TINY, use_pixel_shuffle=True, mlp_connector_layers=2)
    model = EagleModel(cfg)
    assert cfg.num_image_tokens == (TINY.image_size // TINY.patch_size) ** 2 // 4
    x = torch.randn(2, 4, 6, 5)
    out = model.pixel_shuffle(x)
    assert out.shape == (2, 2, 3, 20)
    for a in range(2):
        for b in range(3):
            expected = torch.cat(
                [
                    x[:, 2 * a, 2 * b],
                    x[:, 2 * a, 2 * b + 1],
                    x[:, 2 * a + 1, 2 * b],
                    x[:, 2 * a + 1, 2 * b + 1],
                ],
                -1,
            )
            torch.testing.assert_close(out[:, a, b], expected)
    pixels = torch.randn(1, 3, TINY.image_size, TINY.image_size)
    assert model.extract_feature(pixels).shape == (1, cfg.num_image_tokens, TINY.llm_hidden)
