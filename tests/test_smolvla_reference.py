"""SmolVLA against independent references, through LeRobot's checkpoint names.

The reference is built from transformers' own classes (SmolVLMForConditionalGeneration for the
vision tower, connector and text model; LlamaModel for the action expert, with LeRobot's cross
layers' k/v projections swapped in) and the published formulas written out here: the prefix-LM
mask rule, SmolVLA's RoPE (angle = position / 10000^(2i/D)), eager attention with float32 logits
and float32-min masking, the joint (uncached) forward of prefix and suffix layer by layer with the
expert's self layers sharing one attention with the VLM and its cross layers attending to k/v
projections of the VLM layer's keys/values with query positions restarting at 0, the sinusoidal
time embedding, and 10 Euler steps with t = 1 + step * (-1/10). Our cached, batched inference
path must reproduce it: the weights reach our modules only through `lerobot_names`, so a wrong
name or a transposed tensor fails here too.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from tests.helpers.reference import copy_from_reference, randomise
from tests.helpers.smolvla_checkpoints import policy_config, tiny_model_config, write_tiny_vlm_dir
from vla_inference.models.smolvla import checkpoint as ckpt
from vla_inference.models.smolvla.model import SmolVLABatch, SmolVLAConfig, SmolVLAModel, build, network_time

HEADS = {
    "state_proj": ("vlm", "in"),
    "action_in_proj": ("expert", "in"),
    "action_out_proj": ("expert", "out"),
    "action_time_mlp_in": ("expert", "double"),
    "action_time_mlp_out": ("expert", "same"),
}


class Reference(nn.Module):
    """LeRobot's module tree, from transformers classes: vlm (SmolVLM, text truncated), lm_expert
    (Llama), and the heads."""

    def __init__(self, vlm_config: transformers.SmolVLMConfig, cfg: SmolVLAConfig) -> None:
        super().__init__()
        self.vlm = transformers.SmolVLMForConditionalGeneration(vlm_config)
        text = self.vlm.model.text_model
        text.layers = text.layers[: cfg.vlm.depth]
        expert_cfg = transformers.LlamaConfig(
            hidden_size=cfg.expert.width,
            intermediate_size=cfg.expert.mlp_dim,
            num_hidden_layers=cfg.vlm.depth,
            num_attention_heads=cfg.vlm.num_heads,
            num_key_value_heads=cfg.vlm.num_kv_heads,
            head_dim=cfg.vlm.head_dim,
            rms_norm_eps=cfg.vlm.norm_eps,
            vocab_size=8,
        )
        self.lm_expert = transformers.LlamaModel(expert_cfg)
        kv = cfg.vlm.num_kv_heads * cfg.vlm.head_dim
        for i, layer in enumerate(self.lm_expert.layers):
            if i % cfg.self_attn_every_n_layers:
                layer.self_attn.k_proj = nn.Linear(kv, kv, bias=False)
                layer.self_attn.v_proj = nn.Linear(kv, kv, bias=False)
        self.lm_expert.embed_tokens = None
        w, we, a = cfg.vlm.width, cfg.expert.width, cfg.max_action_dim
        self.state_proj = nn.Linear(cfg.max_state_dim, w)
        self.action_in_proj = nn.Linear(a, we)
        self.action_out_proj = nn.Linear(we, a)
        self.action_time_mlp_in = nn.Linear(2 * we, we)
        self.action_time_mlp_out = nn.Linear(we, we)

    def lerobot_state_dict(self) -> dict[str, Tensor]:
        out = {ckpt.VLM + k: v for k, v in self.vlm.state_dict().items()}
        out |= {ckpt.EXPERT + k: v for k, v in self.lm_expert.state_dict().items()}
        for name in HEADS:
            for leaf, value in getattr(self, name).state_dict().items():
                out[f"model.{name}.{leaf}"] = value
        return out


# ---- the published formulas ------------------------------------------------------------------


def rope(x: Tensor, positions: Tensor) -> Tensor:
    """x (B, T, H, D), positions (B, T): [x1 cos - x2 sin, x2 cos + x1 sin], angle = p / 10000^(2i/D)."""
    half = x.shape[-1] // 2
    timescale = 10_000.0 ** ((2.0 / x.shape[-1]) * torch.arange(half, dtype=torch.float32))
    angle = (positions.float()[..., None] / timescale)[..., None, :]
    x1, x2 = x.float().split(half, dim=-1)
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q (B, T, Hq, D), k/v (B, S, Hkv, D), mask (B, T, S) -> (B, T, Hq*D); eager, float32 logits."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    logits = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * q.shape[-1] ** -0.5
    logits = torch.where(mask[:, None], logits, torch.finfo(torch.float32).min)
    out = torch.einsum("bhts,bshd->bthd", logits.softmax(dim=-1), v.float())
    return out.flatten(2)


def prefix_lm_mask(pad: Tensor, ar: Tensor) -> Tensor:
    c = ar.cumsum(dim=1)
    return (c[:, None, :] <= c[:, :, None]) & pad[:, None, :] & pad[:, :, None]


def time_embedding(t: Tensor, dim: int) -> Tensor:
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    angle = t.double()[:, None] * (2 * math.pi / period)[None]
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


def projections(layer: nn.Module, h: Tensor, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    attn = layer.self_attn
    B, T, _ = h.shape
    return tuple(p(h).view(B, T, -1, head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))  # type: ignore[return-value]


def finish(layer: nn.Module, x: Tensor, att: Tensor) -> Tensor:
    x = x + layer.self_attn.o_proj(att)
    return x + layer.mlp(layer.post_attention_layernorm(x))


def reference_velocity(
    ref: Reference, cfg: SmolVLAConfig, inputs: SmolVLABatch, x_t: Tensor, t: Tensor
) -> Tensor:
    images, image_masks, tokens, token_masks, state = inputs
    vlm, text, expert = ref.vlm.model, ref.vlm.model.text_model, ref.lm_expert
    W, D, B = cfg.vlm.width, cfg.vlm.head_dim, tokens.shape[0]
    embs, pads = [], []
    for slot in range(images.shape[1]):
        feats = vlm.connector(vlm.vision_model(pixel_values=images[:, slot]).last_hidden_state)
        embs.append(feats * math.sqrt(W))
        pads.append(image_masks[:, slot, None].expand(B, feats.shape[1]))
    embs += [text.embed_tokens(tokens) * math.sqrt(W), ref.state_proj(state)[:, None]]
    pads += [token_masks, torch.ones(B, 1, dtype=torch.bool)]
    prefix, P, H = torch.cat(embs, 1), sum(p.shape[1] for p in pads), x_t.shape[1]
    act = ref.action_in_proj(x_t)
    mixed = torch.cat([act, time_embedding(t, act.shape[-1])[:, None].expand_as(act)], dim=2)
    suffix = ref.action_time_mlp_out(F.silu(ref.action_time_mlp_in(mixed)))
    pad = torch.cat([*pads, torch.ones(B, H, dtype=torch.bool)], dim=1)
    ar = torch.zeros(B, P + H, dtype=torch.long)
    ar[:, P - 1 :] = 1  # the state token, then every action token, start new blocks
    mask, positions = prefix_lm_mask(pad, ar), pad.long().cumsum(1) - 1
    pos_p, pos_s = positions[:, :P], positions[:, P:]
    xp, xs = prefix, suffix
    for li in range(cfg.vlm.depth):
        vl, el = text.layers[li], expert.layers[li]
        qp, kp, vp = projections(vl, vl.input_layernorm(xp), D)
        qp, kp = rope(qp, pos_p), rope(kp, pos_p)
        hs = el.input_layernorm(xs)
        if li % cfg.self_attn_every_n_layers == 0:
            qs, ks, vs = projections(el, hs, D)
            q = torch.cat([qp, rope(qs, pos_s)], 1)
            att = attention(q, torch.cat([kp, rope(ks, pos_s)], 1), torch.cat([vp, vs], 1), mask)
            att_p, att_s = att[:, :P], att[:, P:]
        else:
            att_p = attention(qp, kp, vp, mask[:, :P, :P])
            ks = el.self_attn.k_proj(kp.flatten(2)).view(B, P, -1, D)
            vs = el.self_attn.v_proj(vp.flatten(2)).view(B, P, -1, D)
            qs = el.self_attn.q_proj(hs).view(B, H, -1, D)
            qs = rope(qs, pos_s - pos_s.min(dim=1, keepdim=True).values)
            att_s = attention(qs, ks, vs, mask[:, P:, :P])
        xp, xs = finish(vl, xp, att_p), finish(el, xs, att_s)
    return ref.action_out_proj(expert.norm(xs))


def reference_flow(ref: Reference, cfg: SmolVLAConfig, inputs: SmolVLABatch, noise: Tensor) -> Tensor:
    x, dt = noise, -1.0 / 10
    for step in range(10):
        t = torch.full((noise.shape[0],), 1.0 + step * dt, dtype=torch.float32)
        x = x + dt * reference_velocity(ref, cfg, inputs, x, t)
    return x


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[SmolVLAModel, Reference, SmolVLAConfig]:
    torch.manual_seed(0)
    vlm_dir = write_tiny_vlm_dir(tmp_path_factory.mktemp("vlm"), text_layers=6)
    cfg = tiny_model_config(vlm_dir, policy_config(vlm_dir, num_vlm_layers=4))
    raw = ckpt.read_json(vlm_dir / "config.json")
    vlm_config = transformers.SmolVLMConfig(
        **{k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
    )
    ref = Reference(vlm_config, cfg).eval()
    randomise(ref, seed=1)
    ours = build(cfg).eval()
    copy_from_reference(ours, ckpt.lerobot_names(), ref.lerobot_state_dict())
    return ours, ref, cfg


def batch_inputs(cfg: SmolVLAConfig, seed: int) -> SmolVLABatch:
    g = torch.Generator().manual_seed(seed)
    B, N, S, T = 2, 3, cfg.vision.image_size, cfg.tokenizer_max_length
    images = torch.rand(B, N, 3, S, S, generator=g) * 2 - 1
    image_masks = torch.tensor([[True, True, False], [True, False, False]])  # slot 2: a filler camera
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    token_masks = torch.arange(T)[None] < torch.tensor([[5], [T]])
    state = torch.randn(B, cfg.max_state_dim, generator=g)
    return SmolVLABatch(images, image_masks, tokens, token_masks, state)


# ---- tests -------------------------------------------------------------------------------------


def test_tiny_config_read_from_the_smolvlm_config(
    pair: tuple[SmolVLAModel, Reference, SmolVLAConfig],
) -> None:
    _, _, cfg = pair
    assert (cfg.vlm.depth, cfg.expert.depth, cfg.vlm.width, cfg.expert.width) == (4, 4, 32, 24)
    assert cfg.expert.mlp_dim == 256  # 256 * ceil(4 * int(2 * 24 / 3) / 256)
    assert (cfg.vision.grid, cfg.image_tokens) == (8, 4)


def test_vision_tower_and_connector(pair: tuple[SmolVLAModel, Reference, SmolVLAConfig]) -> None:
    ours, ref, cfg = pair
    images = torch.rand(2, 3, cfg.vision.image_size, cfg.vision.image_size) * 2 - 1
    with torch.no_grad():
        theirs = ref.vlm.model.vision_model(pixel_values=images).last_hidden_state
        mine = ours.vision(images)
        assert (mine - theirs).abs().max().item() < 1e-5
        projected = ref.vlm.model.connector(theirs)
        assert (ours.connector(theirs) - projected).abs().max().item() < 1e-6
        assert projected.shape == (2, cfg.image_tokens, cfg.vlm.width)
        scaled = ours.embed_images(images)
        assert (scaled - projected * math.sqrt(cfg.vlm.width)).abs().max().item() < 1e-4


def test_text_layers_match_llama(pair: tuple[SmolVLAModel, Reference, SmolVLAConfig]) -> None:
    """The kept text layers against transformers' LlamaModel (causal, RoPE theta set to SmolVLA's
    10000 in the reference so that both rotate alike)."""
    ours, ref, cfg = pair
    text = ref.vlm.model.text_model
    text.config.rope_parameters = {"rope_type": "default", "rope_theta": 10_000.0}
    text.rotary_emb = type(text.rotary_emb)(text.config)
    x = torch.randn(2, 7, cfg.vlm.width)
    positions = torch.arange(7)[None].expand(2, 7)
    with torch.no_grad():
        theirs = text(inputs_embeds=x, position_ids=positions).last_hidden_state
        causal = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
        mine = ours.vlm(x, positions, causal)
    assert (mine - theirs).abs().max().item() < 1e-5


def test_velocity_matches_the_joint_reference(pair: tuple[SmolVLAModel, Reference, SmolVLAConfig]) -> None:
    ours, ref, cfg = pair
    inputs = batch_inputs(cfg, 3)
    x_t = torch.randn(2, cfg.chunk_size, cfg.max_action_dim)
    t = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        expected = reference_velocity(ref, cfg, inputs, x_t, t)
        cache, context = ours.encode(inputs)
        got = ours.denoise_step(cache, context, x_t, t)
    assert got.shape == expected.shape == (2, cfg.chunk_size, cfg.max_action_dim)
    assert expected.abs().max().item() > 0.1
    assert (got - expected).abs().max().item() < 1e-5


def test_flow_matches_the_reference(pair: tuple[SmolVLAModel, Reference, SmolVLAConfig]) -> None:
    ours, ref, cfg = pair
    inputs = batch_inputs(cfg, 4)
    noise = torch.randn(2, cfg.chunk_size, cfg.max_action_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = reference_flow(ref, cfg, inputs, noise)
        actions, velocity = ours.sample(inputs, noise, 10)
    assert (actions - expected).abs().max().item() < 1e-5
    assert (actions - noise).abs().max().item() > 0.1  # the flow moved
    assert velocity.shape == actions.shape


def test_a_causal_action_token_ignores_later_ones(
    pair: tuple[SmolVLAModel, Reference, SmolVLAConfig],
) -> None:
    """Action tokens are causal among themselves: changing the last action row of x_t leaves the
    velocity of every earlier row unchanged (pi0's bidirectional suffix would not)."""
    ours, _, cfg = pair
    inputs = batch_inputs(cfg, 6)
    x_t = torch.randn(2, cfg.chunk_size, cfg.max_action_dim)
    changed = x_t.clone()
    changed[:, -1] += 1.0
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        cache, context = ours.encode(inputs)
        a, b = ours.denoise_step(cache, context, x_t, t), ours.denoise_step(cache, context, changed, t)
    assert (a[:, :-1] - b[:, :-1]).abs().max().item() < 1e-6
    assert (a[:, -1] - b[:, -1]).abs().max().item() > 1e-3


def test_denoise_step_is_pure_and_differentiable(pair: tuple[SmolVLAModel, Reference, SmolVLAConfig]) -> None:
    ours, _, cfg = pair
    inputs = batch_inputs(cfg, 7)
    with torch.no_grad():
        cache, context = ours.encode(inputs)
    before = cache.k.clone(), cache.v.clone()
    x = torch.randn(2, cfg.chunk_size, cfg.max_action_dim, requires_grad=True)
    t = torch.full((2,), 0.4)
    v1 = ours.denoise_step(cache, context, x, t)
    v1.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum().item() > 0
    v2 = ours.denoise_step(cache, context, x.detach(), t)
    assert torch.equal(v1.detach(), v2)
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])


def test_filler_cameras_change_nothing(pair: tuple[SmolVLAModel, Reference, SmolVLAConfig]) -> None:
    """A masked image slot (LeRobot's empty_cameras filler) is padding: dropping it from the
    prefix, or filling it with other pixels, gives the same actions."""
    ours, _, cfg = pair
    inputs = batch_inputs(cfg, 8)
    noise = torch.randn(2, cfg.chunk_size, cfg.max_action_dim)
    other = inputs._replace(images=inputs.images.clone())
    other.images[:, 2] = 0.3
    with torch.no_grad():
        a, _ = ours.sample(inputs, noise, 10)
        b, _ = ours.sample(other, noise, 10)
        embs, pad, ar = ours.embed_prefix(inputs, slots=(0, 1, 2))  # kept as masked padding
        cache = ours.prefill(embs, pad, ar)
        context = ours.suffix_context(pad)
        t = torch.full((2,), network_time(0, 10))
        v_all = ours.denoise_step(cache, context, noise, t)
        cache2, context2 = ours.encode(inputs)
        v_dropped = ours.denoise_step(cache2, context2, noise, t)
    assert torch.equal(a, b)
    assert (v_all - v_dropped).abs().max().item() < 1e-5


def test_time_arithmetic_is_lerobots_after_2600() -> None:
    """t = 1.0 + step * (-1/steps) in doubles; the float32 accumulation of older releases differs."""
    times = [network_time(step, 10) for step in range(10)]
    assert times[0] == 1.0 and abs(times[-1] - 0.1) < 1e-12
    accumulated, t = [], torch.tensor(1.0, dtype=torch.float32)
    for _ in range(10):
        accumulated.append(t.item())
        t += -0.1
    ours = torch.tensor(times, dtype=torch.float32).tolist()
    assert any(a != b for a, b in zip(ours, accumulated, strict=True))


def test_named_sizes() -> None:
    base = SmolVLAConfig.named("smolvla_base")
    assert (base.vlm.depth, base.vlm.width, base.expert.width, base.expert.mlp_dim) == (16, 960, 720, 2048)
    assert base.image_tokens == 64 and base.prefix_len(3) == 3 * 64 + 48 + 1
    with pytest.raises(ValueError, match="unknown SmolVLA size"):
        SmolVLAConfig.named("nope")


def test_tiny_named_size_runs() -> None:
    cfg = SmolVLAConfig.named("tiny")
    model = build(cfg)
    inputs = batch_inputs(cfg, 9)
    with torch.no_grad():
        actions, _ = model.sample(inputs, torch.randn(2, cfg.chunk_size, cfg.max_action_dim), 10)
    assert actions.shape == (2, cfg.chunk_size, cfg.max_action_dim)
    assert torch.isfinite(actions).all()
