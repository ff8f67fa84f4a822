"""GR00T N1.5 against independent references, tiny random weights (fp32, CPU).

Backbone: the shared Decoder in Qwen3's configuration equals transformers' Qwen3Model (GQA, q/k
RMSNorm, RoPE, causal + padding mask, final norm), the shared ViT tower equals transformers'
SiglipVisionModel (N1.5's Eagle 2.5 builds its vision tower as SiglipVisionModel and loads
SigLIP2-400M weights into it), and the Eagle composition (tower -> mlp1 -> scatter into the
<IMG_CONTEXT> rows -> Qwen3) equals the same assembled from transformers modules.

Action head: the VL adapter, the DiT (diffusers' Timesteps / TimestepEmbedding / Attention /
FeedForward with GR00T's adaptive LayerNorm and output modulation written out), the
category-specific state / action encoders and decoder, and the 4-step Euler schedule over the
1000 timestep buckets, written out here from the published formulas, equal our sampler.

Every weight is copied through the checkpoint name map, so the map is checked too.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
import transformers
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps

from tests.helpers import groot_head as head_ref
from tests.helpers.reference import copy_from_reference, randomise, submap
from vla_inference.models.common import flow
from vla_inference.models.common.transformer import Decoder
from vla_inference.models.common.vit import VisionTower
from vla_inference.models.groot.checkpoint import groot_names
from vla_inference.models.groot.model import GR00TN15, SIZES, EagleBackbone, GrootBatch

TINY = SIZES["tiny"]
EAGLE, HEAD = TINY.backbone, TINY.head
LLM, VISION = EAGLE.llm, EAGLE.vision
_LM = "backbone.eagle_model.language_model.model."
_VISION = "backbone.eagle_model.vision_model.vision_model."


def _qwen3(layers: int) -> transformers.Qwen3Model:
    return transformers.Qwen3Model(
        transformers.Qwen3Config(
            vocab_size=EAGLE.vocab_size,
            hidden_size=LLM.width,
            intermediate_size=LLM.mlp_dim,
            num_hidden_layers=layers,
            num_attention_heads=LLM.num_heads,
            num_key_value_heads=LLM.num_kv_heads,
            head_dim=LLM.head_dim,
            rope_theta=LLM.rope_theta,
            rms_norm_eps=LLM.norm_eps,
            max_position_embeddings=128,
            attention_bias=False,
            attn_implementation="eager",
        )
    ).eval()


def _siglip() -> transformers.SiglipVisionModel:
    return transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(
            hidden_size=VISION.width,
            intermediate_size=VISION.mlp_dim,
            num_hidden_layers=VISION.depth,
            num_attention_heads=VISION.num_heads,
            image_size=VISION.image_size,
            patch_size=VISION.patch_size,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=VISION.norm_eps,
            attn_implementation="eager",
        )
    ).eval()


def test_qwen3_matches_transformers() -> None:
    for layers in (1, 2):
        cfg = replace(TINY, backbone=replace(EAGLE, select_layer=layers))
        reference = _qwen3(layers)
        randomise(reference, seed=layers)
        ours = Decoder(cfg.backbone.llm, vocab_size=cfg.backbone.vocab_size, layers=layers).eval()
        copy_from_reference(ours, submap(groot_names(cfg), "backbone.llm.", _LM), reference.state_dict())
        torch.manual_seed(0)
        embeds = torch.randn(2, 11, LLM.width)
        mask = torch.ones(2, 11, dtype=torch.bool)
        mask[1, 7:] = False  # right padding on the second row
        positions = torch.arange(11)[None].expand(2, 11)
        causal = torch.ones(11, 11, dtype=torch.bool).tril()[None, None] & mask[:, None, None, :]
        with torch.no_grad():
            expected = reference(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state
            got = ours(embeds, positions, causal)
            alone = ours(embeds[1:2, :7], positions[:1, :7], causal[1:2, :, :7, :7])
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1, :7], expected[1, :7], rtol=1e-5, atol=1e-5)
        # The padded row's real tokens equal the same prompt run alone (right padding is invisible).
        torch.testing.assert_close(got[1:2, :7], alone, rtol=1e-5, atol=1e-5)


def test_siglip_tower_matches_transformers() -> None:
    reference = _siglip()
    randomise(reference, seed=5)
    ours = VisionTower(VISION).eval()
    # transformers 5 names SiglipVisionModel's tensors below the "vision_model." level upstream has
    state = {k.removeprefix("vision_model."): v for k, v in reference.state_dict().items()}
    copy_from_reference(ours, submap(groot_names(TINY), "backbone.vision.", _VISION), state)
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, VISION.image_size, VISION.image_size)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == (3, (VISION.image_size // VISION.patch_size) ** 2, VISION.width)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_eagle_backbone_matches_transformers_composition() -> None:
    """Vision tower -> mlp1 -> scatter into the <IMG_CONTEXT> rows -> Qwen3 (last_hidden_state),
    assembled from transformers modules, equals our EagleBackbone (two prompts, two images for
    the first, one for the second, right-padded). Images come per row (B, V, ...): row b's k-th
    <IMG_CONTEXT> takes row b's k-th image token; the second row's unused view is never read."""
    ours = EagleBackbone(EAGLE).eval()
    randomise(ours, seed=9)
    w = {
        k.removeprefix("backbone.eagle_model."): v
        for k, v in groot_names(TINY)
        .to_checkpoint({"backbone." + k: v for k, v in ours.state_dict().items()})
        .items()
    }
    lm, vit = _qwen3(EAGLE.select_layer), _siglip()
    lm.load_state_dict(
        {k.removeprefix("language_model.model."): v for k, v in w.items() if k.startswith("language_model.")}
    )
    level = "vision_model." if any(k.startswith("vision_model.") for k in vit.state_dict()) else ""
    missing, unexpected = vit.load_state_dict(
        {
            level + k.removeprefix("vision_model.vision_model."): v
            for k, v in w.items()
            if k.startswith("vision_model.")
        },
        strict=False,
    )
    assert unexpected == [] and all(m.removeprefix(level).startswith("head.") for m in missing)

    n_img, img = EAGLE.num_image_tokens, EAGLE.image_token_id
    row0 = [1, 2, *([img] * n_img), 3, *([img] * n_img), 4, 5, 6]
    row1 = [7, *([img] * n_img), 8, 9]
    ids = torch.zeros(2, len(row0), dtype=torch.long)
    mask = torch.zeros(2, len(row0), dtype=torch.bool)
    ids[0], mask[0] = torch.tensor(row0), True
    ids[1, : len(row1)], mask[1, : len(row1)] = torch.tensor(row1), True
    images = torch.randn(3, 3, VISION.image_size, VISION.image_size)  # row 0's two, then row 1's one
    unused = torch.randn(3, VISION.image_size, VISION.image_size)  # row 1 has one view of two
    pixels = torch.stack([images[:2], torch.stack([images[2], unused])])  # (B, V, 3, S, S)
    with torch.no_grad():
        got = ours(pixels, ids, mask)
        feats = F.linear(vit(pixel_values=images).last_hidden_state, w["mlp1.0.weight"], w["mlp1.0.bias"])
        embeds = lm.embed_tokens(ids).clone()
        embeds[ids == img] = feats.reshape(-1, LLM.width)  # row-major: row 0's tokens, then row 1's
        expected = lm(inputs_embeds=embeds, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, : len(row1)], expected[1, : len(row1)], rtol=1e-5, atol=1e-5)


def test_pixel_shuffle_matches_eagle_definition() -> None:
    """Eagle's pixel shuffle (scale 0.5) maps (N, W, H, C) to (N, W/2, H/2, 4C) with
    out[a, b] = [x[2a, 2b], x[2a, 2b+1], x[2a+1, 2b], x[2a+1, 2b+1]] (derived from its
    view / permute sequence). N1.5 does not use it ("nops"), other Eagle configs do."""
    cfg = replace(EAGLE, use_pixel_shuffle=True, mlp_connector_layers=2)
    model = EagleBackbone(cfg)
    assert cfg.num_image_tokens == (VISION.image_size // VISION.patch_size) ** 2 // 4
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
    pixels = torch.randn(1, 3, VISION.image_size, VISION.image_size)
    assert model.image_features(pixels).shape == (1, cfg.num_image_tokens, LLM.width)


def _loaded(module: torch.nn.Module, w: dict[str, torch.Tensor], prefix: str) -> torch.nn.Module:
    module.load_state_dict(
        {k.removeprefix(prefix): v for k, v in w.items() if k.startswith(prefix)}, strict=True
    )
    return module.eval()


def test_action_head_matches_diffusers_modules_and_the_published_formulas() -> None:
    cfg, dit_cfg, vlsa = HEAD, HEAD.dit, HEAD.vl_adapter
    model = GR00TN15(TINY).eval()
    randomise(model, 13)
    w = groot_names(TINY).to_checkpoint(model.state_dict())
    D, H, steps = dit_cfg.inner_dim, cfg.action_horizon, cfg.num_inference_timesteps

    def blocks(prefix: str, count: int, heads: int, head_dim: int, dim: int, cross: bool) -> list:  # type: ignore[type-arg]
        out = []
        for i in range(count):
            p = f"{prefix}{i}."
            kv = dit_cfg.cross_attention_dim if cross and i % 2 == 0 else None
            attn = Attention(
                query_dim=dim,
                heads=heads,
                dim_head=head_dim,
                cross_attention_dim=kv,
                bias=True,
                out_bias=True,
            )
            ff = FeedForward(dim, activation_fn="gelu-approximate")
            out.append((_loaded(attn, w, p + "attn1."), _loaded(ff, w, p + "ff."), p, kv is not None))
        return out

    # --- the VL adapter: pre-LN self-attention blocks over the LayerNorm-ed backbone tokens
    adapter = blocks(
        "action_head.vl_self_attention.transformer_blocks.",
        vlsa.layers,
        vlsa.heads,
        vlsa.head_dim,
        vlsa.inner_dim,
        False,
    )
    Dv = cfg.backbone_embedding_dim

    def layer_norm(x: torch.Tensor, name: str | None, eps: float) -> torch.Tensor:
        weight, bias = (w[name + ".weight"], w[name + ".bias"]) if name else (None, None)
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def vl_adapter(features: torch.Tensor) -> torch.Tensor:
        x = layer_norm(features, "action_head.vlln", 1e-5)
        for attn, ff, p, _ in adapter:
            x = x + attn(layer_norm(x, p + "norm1", 1e-5))
            x = x + ff(layer_norm(x, p + "norm3", 1e-5))
        return x

    # --- the DiT: diffusers' timestep embedding; GR00T's AdaLayerNorm LN(x)(1 + scale) + shift
    timesteps = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
    temb_mlp = _loaded(TimestepEmbedding(256, D), w, "action_head.model.timestep_encoder.timestep_embedder.")
    dit_blocks = blocks(
        "action_head.model.transformer_blocks.", dit_cfg.layers, dit_cfg.heads, dit_cfg.head_dim, D, True
    )

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w[name + ".weight"], w[name + ".bias"])

    def dit(x: torch.Tensor, vl: torch.Tensor, bucket: torch.Tensor) -> torch.Tensor:
        temb = temb_mlp(timesteps(bucket))
        for attn, ff, p, cross in dit_blocks:
            scale, shift = linear(p + "norm1.linear", F.silu(temb)).chunk(2, dim=1)
            h = layer_norm(x, None, dit_cfg.norm_eps) * (1 + scale[:, None]) + shift[:, None]
            x = x + attn(h, encoder_hidden_states=vl if cross else None)
            x = x + ff(layer_norm(x, None, dit_cfg.norm_eps))
        shift, scale = linear("action_head.model.proj_out_1", F.silu(temb)).chunk(2, dim=1)
        x = layer_norm(x, None, 1e-6) * (1 + scale[:, None]) + shift[:, None]
        return linear("action_head.model.proj_out_2", x)

    def cat_mlp(name: str, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return head_ref.cat_mlp(w, name, x, ids)

    def encode_actions(a: torch.Tensor, bucket: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return head_ref.encode_actions(w, a, bucket, ids, D)

    def reference_sample(
        features: torch.Tensor, state: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B = features.shape[0]
        vl = vl_adapter(features)
        x = noise
        state_feat = cat_mlp("action_head.state_encoder", state, ids)
        future = w["action_head.future_tokens.weight"][None].expand(B, -1, -1)
        for k in range(steps):  # tau = k / steps, bucket = floor(tau * 1000), x += v / steps
            bucket = torch.full((B,), math.floor(k / steps * cfg.num_timestep_buckets))
            a = encode_actions(x, bucket, ids) + w["action_head.position_embedding.weight"][:H][None]
            out = dit(torch.cat([state_feat, future, a], 1), vl, bucket)
            x = x + cat_mlp("action_head.action_decoder", out, ids)[:, -H:] / steps
        return vl, x

    g = torch.Generator().manual_seed(14)
    B, L = 2, 7
    features = torch.randn(B, L, Dv, generator=g)
    state = torch.randn(B, 1, cfg.max_state_dim, generator=g)
    ids = torch.tensor([24, 31])
    noise = torch.randn(B, H, cfg.action_dim, generator=g)
    assert [model.action_head.time_bucket(steps, k) for k in range(steps)] == [0, 250, 500, 750]
    with torch.no_grad():
        vl, x = reference_sample(features, state, ids, noise)

        # ours: the same Euler loop (flow.integrate of GR00TN15.euler_step over GR00TN15.times)
        # against the DiT's cross-attention keys/values of the adapted features and the state
        # features (what GR00TN15.prefix makes from the backbone's)
        mask = torch.ones(B, L, dtype=torch.bool)
        our_vl = model.action_head.process_backbone(features, mask)
        cross_kv = model.new_context(B, L)
        for i, (k, v) in enumerate(model.action_head.dit.cross_kv(our_vl)):
            cross_kv[i, 0], cross_kv[i, 1] = k, v
        state_features = model.action_head.state_encoder(state, ids)
        no_images = torch.zeros(B, 0, 3, VISION.image_size, VISION.image_size)  # the step reads none
        batch = GrootBatch(no_images, torch.zeros(B, L, dtype=torch.long), mask, state, ids)

        def step(x_in: torch.Tensor, time: flow.StepTime) -> tuple[torch.Tensor, torch.Tensor]:
            return model.euler_step(cross_kv, state_features, batch, x_in, time, noise, None, 1.0 / steps)

        ours, _ = flow.integrate(step, model.times(B, steps, noise.dtype, noise.device), noise)
    torch.testing.assert_close(our_vl, vl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-5)

    # the whole sampler (GR00TN15.sample: backbone, context, the same loop) on an unpadded batch
    # of one image per row equals the reference head on our backbone's features
    n_img, img = EAGLE.num_image_tokens, EAGLE.image_token_id
    prompt = torch.tensor([1, 2, *([img] * n_img), 3, 4])
    input_ids = torch.stack([prompt, prompt.roll(1)])  # the image ids one place later in row 1
    pixels = torch.randn(B, 1, 3, VISION.image_size, VISION.image_size, generator=g)
    full = GrootBatch(pixels, input_ids, torch.ones_like(input_ids, dtype=torch.bool), state, ids)
    with torch.no_grad():
        features = model.backbone(pixels, input_ids, full.attention_mask)
        _, expected = reference_sample(features, state, ids, noise)
        sampled, _ = model.sample(full, noise, steps)
    torch.testing.assert_close(sampled, expected, rtol=1e-4, atol=1e-5)
