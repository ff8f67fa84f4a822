"""GR00T N1.7 against independent references, tiny random weights (fp32, CPU).

Backbone: transformers' own Qwen3-VL classes. The vision tower (patch embedding, interpolated
learned positions, 2-D rotary, deepstack mergers, the 2 x 2 merger) equals Qwen3VLVisionModel fed
by transformers' Qwen2-VL image processor; the M-RoPE positions equal Qwen3VLModel.get_rope_index;
the whole backbone (image rows scattered into the prompt, interleaved M-RoPE, deepstack features
added after the first layers, the last kept layer's output without the final norm) equals
Qwen3VLModel cut to select_layer layers, on a left-padded batch of two prompts with two and one
images. Weights are copied through the checkpoint name map, so the map is checked too.

Action head: NVIDIA's published formulas (gr00t/model/modules/dit.py AlternateVLDiT,
gr00t/model/gr00t_n1d7/gr00t_n1d7.py get_action_with_features) written out here over diffusers'
Attention / FeedForward / Timesteps / TimestepEmbedding, and the 4-step Euler schedule over 1000
buckets, equal our sampler.
"""

from __future__ import annotations

import unittest.mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from transformers.models.qwen3_vl import modeling_qwen3_vl as hf

from tests.helpers import groot_head as head_ref
from tests.helpers.groot17_checkpoints import TINY, backbone_config_json
from tests.helpers.reference import copy_from_reference, randomise, submap
from vla_inference.models.groot.cosmos import CosmosBackbone, CosmosVision, mrope_positions
from vla_inference.models.groot.n17 import Groot17, Groot17Batch
from vla_inference.models.groot.n17_checkpoint import n17_names

_VISUAL = "backbone.model.model.visual."
_LM = "backbone.model.model.language_model."
B_CFG = TINY.backbone


def _hf_config() -> transformers.Qwen3VLConfig:
    raw = {k: v for k, v in backbone_config_json().items() if k not in ("model_type", "architectures")}
    raw["text_config"]["num_hidden_layers"] = B_CFG.select_layer  # upstream pops the layers above
    cfg = transformers.Qwen3VLConfig(**raw)
    for part in (cfg, cfg.text_config, cfg.vision_config):
        part._attn_implementation = "eager"  # type: ignore[union-attr]
    return cfg


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    side = TINY.image_size
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def _hf_pixels(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    v = B_CFG.vision
    processor = transformers.Qwen2VLImageProcessor(
        patch_size=v.patch_size,
        temporal_patch_size=v.temporal_patch_size,
        merge_size=v.merge,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        min_pixels=64,
        max_pixels=1 << 24,
    )
    out = processor(images=images, return_tensors="pt", do_resize=False)
    return out["pixel_values"], out["image_grid_thw"]


def _our_pixels(images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


def _hf_model(seed: int) -> hf.Qwen3VLModel:
    model = hf.Qwen3VLModel(_hf_config()).eval()
    randomise(model, seed)
    return model


def test_vision_tower_matches_transformers() -> None:
    reference = _hf_model(1).visual
    ours = CosmosVision(B_CFG.vision).eval()
    copy_from_reference(ours, submap(n17_names(TINY), "backbone.visual.", _VISUAL), reference.state_dict())
    images = _images(3, 2)
    pixel_values, grid = _hf_pixels(images)
    with torch.no_grad():
        expected = reference(pixel_values, grid_thw=grid)
        got = ours(_our_pixels(images))
    tokens = TINY.tokens_per_image
    assert got.tokens.shape == (3, tokens, B_CFG.vision.out_width)
    torch.testing.assert_close(got.tokens.flatten(0, 1), expected.pooler_output, rtol=1e-5, atol=1e-5)
    assert len(got.deepstack) == len(expected.deepstack_features) == len(B_CFG.vision.deepstack)
    for ours_ds, theirs in zip(got.deepstack, expected.deepstack_features, strict=True):
        torch.testing.assert_close(ours_ds.flatten(0, 1), theirs, rtol=1e-5, atol=1e-5)


def _prompts() -> tuple[torch.Tensor, torch.Tensor, int]:
    """Two prompts as the N1.7 processor renders them (images, then text), left-padded."""
    t, img, vs, ve = TINY.tokens_per_image, B_CFG.image_token_id, B_CFG.vision_start_id, B_CFG.vision_end_id
    image = [vs, *([img] * t), ve]
    row0 = [154, 1, *image, *image, 4, 5, 6, 7, 155]
    row1 = [154, 1, *image, 9, 10, 155]
    L = len(row0)
    ids = torch.full((2, L), 149, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.bool)
    ids[0], mask[0] = torch.tensor(row0), True
    ids[1, L - len(row1) :], mask[1, L - len(row1) :] = torch.tensor(row1), True
    return ids, mask, L - len(row1)


def test_mrope_positions_match_transformers() -> None:
    ids, mask, _ = _prompts()
    _, grid = _hf_pixels(_images(3, 4))
    types = (ids == B_CFG.image_token_id).int()  # transformers 5: which tokens are image tokens
    expected, _ = _hf_model(3).get_rope_index(ids, types, grid, None, attention_mask=mask.long())  # type: ignore[arg-type]
    side = TINY.image_size // (B_CFG.vision.patch_size * B_CFG.vision.merge)
    got = mrope_positions(ids, mask, (side, side), B_CFG.image_token_id)
    assert torch.equal(got[:, mask], expected[:, mask])


def test_backbone_matches_transformers_qwen3vl() -> None:
    reference = _hf_model(5)
    ours = CosmosBackbone(B_CFG).eval()
    names = n17_names(TINY)
    state = {f"visual.{k}": v for k, v in reference.visual.state_dict().items()}
    state |= {f"llm.{k}": v for k, v in reference.language_model.state_dict().items()}
    theirs = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        theirs[(_VISUAL if part == "visual" else _LM) + rest] = value
    copy_from_reference(ours, submap(names, "backbone.", "backbone.model.model."), {
        k.removeprefix("backbone.model.model."): v for k, v in theirs.items()
    })  # fmt: skip
    ids, mask, pad = _prompts()
    images = _images(3, 6)
    pixel_values, grid = _hf_pixels(images)
    captured: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, _i: object, out: object) -> None:
        captured["x"] = out if isinstance(out, torch.Tensor) else out[0]  # type: ignore[index]

    handle = reference.language_model.layers[-1].register_forward_hook(hook)
    with torch.no_grad():
        reference(
            input_ids=ids,
            attention_mask=mask.long(),
            pixel_values=pixel_values,
            image_grid_thw=grid,
            mm_token_type_ids=(ids == B_CFG.image_token_id).int(),
        )
        side = TINY.image_size // (B_CFG.vision.patch_size * B_CFG.vision.merge)
        positions = mrope_positions(ids, mask, (side, side), B_CFG.image_token_id)
        pixels = torch.zeros(2, 2, *_our_pixels(images).shape[1:])
        pixels[0], pixels[1, :1] = _our_pixels(images[:2]), _our_pixels(images[2:])  # row 1: one image
        got = ours(pixels, ids, mask, positions)
        alone = ours(
            _our_pixels(images[2:])[None], ids[1:, pad:], mask[1:, pad:], positions[:, 1:, pad:]
        )  # the padded row by itself
    handle.remove()
    expected = captured["x"]
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, pad:], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()  # left padding: padded queries see themselves, no NaN


def _loaded(module: torch.nn.Module, w: dict[str, torch.Tensor], prefix: str) -> torch.nn.Module:
    module.load_state_dict(
        {k.removeprefix(prefix): v for k, v in w.items() if k.startswith(prefix)}, strict=True
    )
    return module.eval()


@pytest.mark.parametrize("padded", [False, True])
def test_action_head_matches_the_published_formulas(padded: bool) -> None:
    cfg = TINY
    h = cfg.head
    model = Groot17(cfg).eval()
    randomise(model, 13)
    w = n17_names(cfg).to_checkpoint(model.state_dict())
    D, H, steps = h.dit.inner_dim, h.action_horizon, h.num_inference_timesteps

    def block(prefix: str, heads: int, head_dim: int, dim: int, kv: int | None) -> tuple:  # type: ignore[type-arg]
        attn = Attention(
            query_dim=dim, heads=heads, dim_head=head_dim, cross_attention_dim=kv, bias=True, out_bias=True
        )
        ff = FeedForward(dim, activation_fn="gelu-approximate")
        return _loaded(attn, w, prefix + "attn1."), _loaded(ff, w, prefix + "ff.")

    def layer_norm(x: torch.Tensor, name: str | None, eps: float) -> torch.Tensor:
        weight, bias = (w[name + ".weight"], w[name + ".bias"]) if name else (None, None)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w[name + ".weight"], w[name + ".bias"])

    a = h.vl_adapter
    assert a.layers
    vlsa = "action_head.vl_self_attention.transformer_blocks."
    adapter = [
        (*block(f"{vlsa}{i}.", a.heads, a.head_dim, a.inner_dim, None), f"{vlsa}{i}.")
        for i in range(a.layers)
    ]

    def vl_adapter(features: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = layer_norm(features, "action_head.vlln", 1e-5)
        for attn, ff, p in adapter:
            x = x + attn(layer_norm(x, p + "norm1", 1e-5), attention_mask=key_mask)
            x = x + ff(layer_norm(x, p + "norm3", 1e-5))
        return x

    timesteps = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
    temb_mlp = _loaded(TimestepEmbedding(256, D), w, "action_head.model.timestep_encoder.timestep_embedder.")
    dit = "action_head.model.transformer_blocks."
    blocks = [
        (*block(f"{dit}{i}.", h.dit.heads, h.dit.head_dim, D, None if i % 2 else h.backbone_embedding_dim), i)
        for i in range(h.dit.layers)
    ]

    def alternate_dit(
        x: torch.Tensor, vl: torch.Tensor, image: torch.Tensor, real: torch.Tensor, t: torch.Tensor
    ):  # type: ignore[no-untyped-def]
        temb = temb_mlp(timesteps(t))
        for attn, ff, i in blocks:
            scale, shift = linear(f"{dit}{i}.norm1.linear", F.silu(temb)).chunk(2, dim=1)
            hx = layer_norm(x, None, 1e-5) * (1 + scale[:, None]) + shift[:, None]
            if i % 2 == 1:
                x = x + attn(hx)
            else:  # even blocks: text when idx % (2 n) == 0, image otherwise; padding never
                keys = (~image & real) if i % (2 * h.dit.attend_text_every_n_blocks) == 0 else (image & real)
                x = x + attn(hx, encoder_hidden_states=vl, attention_mask=keys)
            x = x + ff(layer_norm(x, None, 1e-5))
        shift, scale = linear("action_head.model.proj_out_1", F.silu(temb)).chunk(2, dim=1)
        x = layer_norm(x, None, 1e-6) * (1 + scale[:, None]) + shift[:, None]
        return linear("action_head.model.proj_out_2", x)

    def cat_mlp(name: str, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return head_ref.cat_mlp(w, name, x, ids)

    def encode_actions(a: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return head_ref.encode_actions(w, a, t, ids, D)

    g = torch.Generator().manual_seed(14)
    B, L = 2, 11
    features = torch.randn(B, L, h.backbone_embedding_dim, generator=g)
    image = torch.zeros(B, L, dtype=torch.bool)
    image[:, 2:6] = True
    real = torch.ones(B, L, dtype=torch.bool)
    if padded:
        real[1, :3] = False  # left padding; the padding is not an image token
        image[1, :3] = False
    state = torch.randn(B, h.state_history, h.max_state_dim, generator=g)
    ids = torch.tensor([2, 24])
    noise = torch.randn(B, H, h.action_dim, generator=g)
    with torch.no_grad():
        expected = []
        for b in range(B):  # upstream, one unpadded sample at a time
            keep = real[b]
            vl = vl_adapter(features[b : b + 1, keep], None)  # type: ignore[arg-type]
            img, ones = image[b : b + 1, keep], torch.ones(1, int(keep.sum()), dtype=torch.bool)
            x = noise[b : b + 1]
            state_feat = cat_mlp(
                "action_head.state_encoder", state[b : b + 1].reshape(1, 1, -1), ids[b : b + 1]
            )
            for k in range(steps):  # t = int(k / steps * 1000), x += v / steps
                t = torch.full((1,), int(k / steps * h.num_timestep_buckets))
                a = (
                    encode_actions(x, t, ids[b : b + 1])
                    + w["action_head.position_embedding.weight"][:H][None]
                )
                out = alternate_dit(torch.cat([state_feat, a], 1), vl, img, ones, t)
                x = x + cat_mlp("action_head.action_decoder", out, ids[b : b + 1])[:, -H:] / steps
            expected.append(x)

        # our sampler's prefix (its backbone replaced by the features) and Euler steps
        batch = Groot17Batch(
            pixels=torch.zeros(B, 0, 3, 1, 1),
            input_ids=torch.where(image, TINY.backbone.image_token_id, 1),
            attention_mask=real,
            positions=torch.zeros(B, 3, L, dtype=torch.long),
            state=state,
            embodiment_ids=ids,
        )
        with unittest.mock.patch.object(model, "features", lambda batch, check: features):
            x, _ = model.sample(batch, noise, steps)
    torch.testing.assert_close(x, torch.cat(expected), rtol=1e-4, atol=1e-5)
