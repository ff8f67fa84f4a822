"""pi0 / pi0.5 network behaviour on tiny random weights (openpi "dummy" Gemma sizes, tiny SigLIP).

- a batch gives each sample exactly what it gets alone (per-sample seeds, masks, padding);
- the KV-cache sampler (prefix once, suffix per step) equals recomputing prefix + suffix jointly at
  every Euler step (the reference's training-style computation with the block-causal mask);
- masked image slots and padding tokens do not influence the result;
- pi0.5 (adaRMSNorm, state in the prompt) runs and differs from pi0.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from tests.helpers.pi0_checkpoints import write_tiny_openpi_checkpoint
from vla_inference.config import Settings
from vla_inference.models.base import Observation
from vla_inference.models.common.init import init_random_weights
from vla_inference.models.common.masks import block_causal_mask
from vla_inference.models.common.transformer import KVCache
from vla_inference.models.pi0.model import SIZES, Pi0Batch, Pi0Model, build
from vla_inference.models.pi0.policy import Pi0Policy

ATOL = 2e-5


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and shared CI cores make two threads spin; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pi0Policy]:
    out = {}
    for variant in ("pi0", "pi05"):
        path = write_tiny_openpi_checkpoint(tmp_path_factory.mktemp(variant) / "ckpt", variant, seed=1)
        policy = Pi0Policy(Settings(chunk_size=50))
        policy.load(str(path), "cpu")
        out[variant] = policy
    return out


def _observations() -> list[Observation]:
    rng = np.random.default_rng(0)

    def img(h: int, w: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    return [
        Observation(
            images={"base": img(224, 224)},
            joint_positions=rng.normal(size=7).astype(np.float32),
            instruction="pick up the cup",
            seed=11,
        ),
        Observation(
            images={"base": img(480, 640), "left_wrist": img(120, 160)},
            joint_positions=rng.normal(size=7).astype(np.float32),
            instruction="open the top drawer and put the bowl inside, then close it",
            seed=12,
        ),
        Observation(
            images={"right_wrist": img(64, 64)},
            joint_positions=rng.normal(size=7).astype(np.float32),
            instruction="",
            seed=13,
        ),
    ]


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_batch_equals_one_by_one(policies: dict[str, Pi0Policy], variant: str) -> None:
    policy = policies[variant]
    samples = [policy.prepare(o) for o in _observations()]
    batched = policy.forward(samples)
    for sample, raw in zip(samples, batched, strict=True):
        alone = policy.forward([sample])[0]
        np.testing.assert_allclose(raw.actions, alone.actions, atol=ATOL, rtol=0)
        assert raw.confidence == pytest.approx(alone.confidence, abs=1e-6)
    # different samples really are different
    assert not np.allclose(batched[0].actions, batched[1].actions)


def test_same_seed_same_actions_different_seed_different(policies: dict[str, Pi0Policy]) -> None:
    policy = policies["pi0"]
    obs = _observations()[0]
    a = policy.predict(obs).actions
    b = policy.predict(obs).actions
    np.testing.assert_array_equal(a, b)
    other = Observation(
        images=obs.images, joint_positions=obs.joint_positions, instruction=obs.instruction, seed=99
    )
    assert not np.allclose(a, policy.predict(other).actions)


def _inputs(cfg_name: str, batch: int = 2, seed: int = 0) -> tuple[Pi0Model, tuple[torch.Tensor, ...]]:
    cfg = SIZES[cfg_name]
    model = build(cfg).eval()
    init_random_weights(model, seed)
    g = torch.Generator().manual_seed(seed)
    n, s = len(cfg.image_slots), cfg.vision.image_size
    images = torch.rand(batch, n, 3, s, s, generator=g) * 2 - 1
    image_masks = torch.tensor([[True, False, True], [True, True, False]])[:batch]
    tokens = torch.randint(0, cfg.vocab_size, (batch, 12), generator=g)
    token_masks = torch.zeros(batch, 12, dtype=torch.bool)
    token_masks[0, :5] = True
    token_masks[1, :12] = True
    state = torch.randn(batch, cfg.action_dim, generator=g)
    noise = torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=g)
    return model, (images, image_masks, tokens, token_masks, state, noise)


@pytest.mark.parametrize("cfg_name", ["pi0_dummy", "pi05_dummy"])
def test_kv_cache_equals_full_recompute(cfg_name: str) -> None:
    model, (images, image_masks, tokens, token_masks, state, noise) = _inputs(cfg_name)
    steps = 5
    with torch.inference_mode():
        batch = Pi0Batch(images, image_masks, tokens, token_masks, state)
        cached, last_v = model.sample(batch, noise, steps)
        # reference: every step recomputes the whole sequence (prefix + suffix) through both experts
        x = noise.clone()
        dt = -1.0 / steps
        v = torch.zeros_like(x)
        for i in range(steps):  # t_i = 1 - i / steps
            t = torch.full((noise.shape[0],), 1.0 - i / steps)
            v = model.velocity_full(batch, x, t)
            x = x + dt * v
    assert torch.isfinite(cached).all()
    torch.testing.assert_close(cached, x, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(last_v, -v, atol=ATOL, rtol=1e-5)  # the sampler's velocity points to the data
    assert cached.abs().max() > 0.1  # not a degenerate all-zero result


def test_masked_images_and_padding_tokens_are_ignored() -> None:
    model, (images, image_masks, tokens, token_masks, state, noise) = _inputs("pi0_dummy")
    g = torch.Generator().manual_seed(5)
    images2 = images.clone()
    images2[~image_masks] = torch.rand(int((~image_masks).sum()), *images.shape[2:], generator=g)
    tokens2 = torch.where(token_masks, tokens, torch.randint(0, 500, tokens.shape, generator=g))
    with torch.inference_mode():
        a, _ = model.sample(Pi0Batch(images, image_masks, tokens, token_masks, state), noise, 3)
        b, _ = model.sample(Pi0Batch(images2, image_masks, tokens2, token_masks, state), noise, 3)
        # a visible image does matter
        images3 = images.clone()
        images3[0, 0] = -images3[0, 0]
        c, _ = model.sample(Pi0Batch(images3, image_masks, tokens, token_masks, state), noise, 3)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
    assert not torch.allclose(a[0], c[0], atol=1e-4)
    torch.testing.assert_close(a[1], c[1], atol=ATOL, rtol=1e-5)  # the other sample is untouched


def test_block_causal_mask_matches_reference_rule() -> None:
    # prefix of 3 (last one padding), then pi0 suffix: state block, then 2 action tokens in one block
    ar = torch.tensor([[0, 0, 0, 1, 1, 0]])
    pad = torch.tensor([[True, True, False, True, True, True]])
    mask = block_causal_mask(ar, pad)[0].int()
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],  # padding sees only itself (never read)
            [1, 1, 0, 1, 0, 0],  # state: prefix + itself
            [1, 1, 0, 1, 1, 1],  # actions: prefix + state + all actions
            [1, 1, 0, 1, 1, 1],
        ]
    )
    assert torch.equal(mask, expected)


def test_pi05_runs_and_differs_from_pi0(policies: dict[str, Pi0Policy]) -> None:
    obs = _observations()[1]
    a = policies["pi0"].predict(obs)
    b = policies["pi05"].predict(obs)
    assert a.actions.shape == b.actions.shape == (50, 7)
    assert np.isfinite(b.actions).all() and 0.0 <= b.confidence <= 1.0
    assert not np.allclose(a.actions, b.actions)
    assert policies["pi05"].config.pi05 and not policies["pi0"].config.pi05
    assert hasattr(policies["pi05"].model, "time_mlp_in") and not hasattr(
        policies["pi05"].model, "state_proj"
    )


def test_pi05_state_enters_through_the_prompt(policies: dict[str, Pi0Policy]) -> None:
    policy = policies["pi05"]
    obs = _observations()[0]
    moved = Observation(
        images=obs.images,
        joint_positions=obs.joint_positions + 1.0,
        instruction=obs.instruction,
        seed=obs.seed,
    )
    s1, s2 = policy.prepare(obs), policy.prepare(moved)
    assert not np.array_equal(s1.inputs.tokens, s2.inputs.tokens)
    assert not np.allclose(policy.forward([s1])[0].actions, policy.forward([s2])[0].actions)


@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_published_sizes_have_consistent_shapes_on_meta(name: str) -> None:
    """The real-size network runs on the meta device (shapes only, no memory): SigLIP So400m gives
    256 tokens per camera in the VLM's width, the prefix of three cameras and the longest prompt
    fills the KV cache of all 18 layers, and an Euler step returns a velocity per action."""
    cfg = SIZES[name]
    model = build(cfg, device="meta").eval()
    B, s = 2, cfg.vision.image_size
    P = 3 * cfg.vision.num_patches + cfg.max_token_len
    with torch.device("meta"), torch.inference_mode():
        tokens = model.projector(model.vision(torch.zeros(B, 3, s, s)))
        assert tokens.shape == (B, 256, 2048)
        pad = torch.ones(B, P, dtype=torch.bool)
        cache = KVCache.allocate(18, B, 1, P, 256, torch.zeros(1))
        model.prefill(torch.zeros(B, P, 2048), pad, cache)
        assert cache.k.shape == (18, B, 1, P, 256)
        velocity = model.denoise_step(
            cache, model.suffix_context(pad), torch.zeros(B, 32), torch.zeros(B, 50, 32), torch.ones(B)
        )
    assert velocity.shape == (B, 50, 32)
