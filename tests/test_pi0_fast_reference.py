"""pi0-FAST's network and decoding against transformers' PaliGemma, on tiny random weights (fp32).

The reference is transformers' PaliGemmaForConditionalGeneration (SigLIP tower, projector, Gemma with
its scaled token embedding, untied LM head as LeRobot saves it), its weights copied through our
LeRobot name map, run without a cache over the whole sequence [images | prompt | decoded tokens]
with the prefix-LM mask written out here (prefix bidirectional among valid tokens, decoded tokens
causal) and positions = cumsum(valid) - 1. Our prefill + cached decode must pick the same greedy
tokens with the same probabilities; a batch must equal each of its rows alone. Sampling: the
exponential race draws each token with its softmax probability, from the row's own seed.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from tests.helpers.pi0_fast_checkpoints import full_mask
from tests.helpers.reference import copy_from_reference, randomise
from vla_inference.models.common.transformer import KVCache
from vla_inference.models.pi0_fast import checkpoint as ckpt
from vla_inference.models.pi0_fast.model import (
    SIZES,
    DecodeState,
    Generated,
    Pi0FastBatch,
    Pi0FastConfig,
    Pi0FastModel,
    Rules,
    build,
    choose,
    decode,
    finished,
    prefix_lm_mask,
    race_noise,
    row_key,
)

PG = "model.paligemma_with_expert.paligemma."


def _reference(cfg: Pi0FastConfig, tied: bool) -> transformers.PaliGemmaForConditionalGeneration:
    hf = transformers.PaliGemmaConfig(tie_word_embeddings=tied)
    vlm, vision = cfg.vlm, cfg.vision
    sizes = (
        (
            hf.text_config,
            {
                "vocab_size": cfg.vocab_size,
                "hidden_size": vlm.width,
                "intermediate_size": vlm.mlp_dim,
                "num_attention_heads": vlm.num_heads,
                "num_key_value_heads": vlm.num_kv_heads,
                "head_dim": vlm.head_dim,
                "num_hidden_layers": vlm.depth,
                "hidden_activation": "gelu_pytorch_tanh",
            },
        ),
        (
            hf.vision_config,
            {
                "hidden_size": vision.width,
                "intermediate_size": vision.mlp_dim,
                "num_hidden_layers": vision.depth,
                "num_attention_heads": vision.num_heads,
                "patch_size": vision.patch_size,
                "image_size": vision.image_size,
                "projection_dim": vlm.width,
            },
        ),
    )
    for part, values in sizes:
        for key, value in values.items():
            setattr(part, key, value)
    model = transformers.PaliGemmaForConditionalGeneration(hf).eval()
    randomise(model, 0)
    return model


def _in_lerobot_names(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference's state dict as LeRobot's file names it (transformers 5 drops the
    "vision_model." level that LeRobot's pinned transformers keeps: put back)."""
    out = {}
    for name, tensor in reference.state_dict().items():
        name = name.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1)
        out[PG + name] = tensor
    return out


def _ours(reference: torch.nn.Module, tied: bool) -> Pi0FastModel:
    cfg = Pi0FastConfig.named("tiny", tied_lm_head=tied)
    model = build(cfg).eval()
    names = ckpt.lerobot_names(ckpt.EMBED_KEY, None if tied else ckpt.LM_HEAD_KEY)
    copy_from_reference(model, names, _in_lerobot_names(reference))
    return model


def _inputs(seed: int = 0) -> Pi0FastBatch:
    """Two rows: different prompt lengths (right padding), the second camera missing in row 1."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 2, 3, 224, 224, generator=g) * 2 - 1
    image_masks = torch.tensor([[True, True], [True, False]])
    tokens = torch.randint(5, 600, (2, 9), generator=g)
    token_masks = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    tokens[1, 5:] = 0  # padding ids
    seeds = torch.tensor([row_key(7), row_key(8)])
    return Pi0FastBatch(images, image_masks, tokens, token_masks, seeds)


def _reference_logits(
    reference: transformers.PaliGemmaForConditionalGeneration,
    batch: Pi0FastBatch,
    decoded: torch.Tensor,
    position_offset: int = 0,
) -> torch.Tensor:
    """Logits (B, n, V) predicting decoded[:, 0..n-1] from one uncached pass over
    [images | prompt | decoded[:, :-1]]."""
    B, N = batch.image_masks.shape
    feats = [
        reference.model.get_image_features(pixel_values=batch.images[:, i]).pooler_output for i in range(N)
    ]
    patches = feats[0].shape[1]
    text = reference.model.language_model.embed_tokens(torch.cat([batch.tokens, decoded[:, :-1]], dim=1))
    embeds = torch.cat([*feats, text], dim=1)
    prefix_valid = torch.cat([batch.image_masks.repeat_interleave(patches, 1), batch.token_masks], 1)
    P, n = prefix_valid.shape[1], decoded.shape[1]
    valid = torch.cat([prefix_valid, torch.ones(B, n - 1, dtype=torch.bool)], 1)
    positions = torch.cumsum(valid.long(), 1) - 1
    positions[:, P:] += position_offset
    hidden = reference.model.language_model(
        inputs_embeds=embeds, attention_mask=full_mask(prefix_valid, n - 1), position_ids=positions
    ).last_hidden_state
    last_prefix = torch.where(prefix_valid, torch.arange(P), -1).amax(1)
    rows = hidden[torch.arange(B), last_prefix][:, None]
    return reference.lm_head(torch.cat([rows, hidden[:, P:]], 1))


NEVER = Rules(stop_token=-1, pad_token=0)  # no token stops a row


@pytest.mark.parametrize(("tied", "offset"), [(False, 0), (True, 1)])
def test_cached_decode_equals_full_recompute(tied: bool, offset: int) -> None:
    reference = _reference(SIZES["tiny"], tied)
    model = _ours(reference, tied)
    batch = _inputs()
    out = model.generate(batch, NEVER._replace(position_offset=offset), 8)
    with torch.no_grad():
        logits = _reference_logits(reference, batch, out.tokens, offset)
    assert out.tokens.shape == (2, 8) and out.lengths.tolist() == [8, 8] and not out.stopped.any()
    assert torch.equal(logits.argmax(-1), out.tokens)  # the same greedy tokens at every step
    probs = torch.softmax(logits.float(), -1).gather(-1, out.tokens[..., None])[..., 0]
    torch.testing.assert_close(out.probs, probs, atol=1e-5, rtol=1e-5)
    # the two rows decode different sequences (a mix-up between rows would show)
    assert not torch.equal(out.tokens[0], out.tokens[1])


def test_prefix_is_bidirectional_and_decoding_causal() -> None:
    """The reference's mask is the right one to check against: changing the last prompt token
    changes the first prompt token's output (bidirectional prefix), and a decoded token never
    changes the prefix's keys (they come from the prefill alone)."""
    reference = _reference(SIZES["tiny"], False)
    model = _ours(reference, False)
    batch = _inputs(1)
    valid = torch.ones(1, 6, dtype=torch.bool)
    mask = prefix_lm_mask(valid)
    assert mask.shape == (1, 1, 6, 6) and bool(mask.all())
    padded = prefix_lm_mask(torch.tensor([[True, True, False]]))[0, 0]
    assert padded.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    first = model.generate(batch, NEVER, 2)
    changed = batch.tokens.clone()
    changed[0, -1] += 1  # the last valid prompt token of row 0 only
    second = model.generate(batch._replace(tokens=changed), NEVER, 2)
    assert not torch.allclose(first.probs[0], second.probs[0])
    torch.testing.assert_close(first.probs[1], second.probs[1])  # row 1 untouched


def _row(batch: Pi0FastBatch, i: int) -> Pi0FastBatch:
    """Row i alone, its prompt trimmed to its own valid tokens (no padding at all)."""
    n = int(batch.token_masks[i].sum())
    return Pi0FastBatch(
        batch.images[i : i + 1],
        batch.image_masks[i : i + 1],
        batch.tokens[i : i + 1, :n],
        batch.token_masks[i : i + 1, :n],
        batch.seeds[i : i + 1],
    )


def _stopping_row_0_at_its_4th_token() -> tuple[Pi0FastModel, Pi0FastBatch, Generated, Rules]:
    """A random model, two rows, their free decode of 10 tokens, and rules whose stop token is row
    0's 4th (a token row 0 does not write before it)."""
    model = build(SIZES["tiny"]).eval()
    randomise(model, 5)
    batch = _inputs(2)
    free = model.generate(batch, NEVER, 10)
    stop = int(free.tokens[0, 3])
    assert stop not in free.tokens[0, :3].tolist()
    return model, batch, free, Rules(stop_token=stop, pad_token=0)


def test_batch_equals_each_row_alone_with_independent_stops() -> None:
    model, batch, free, rules = _stopping_row_0_at_its_4th_token()
    out = model.generate(batch, rules, 10)
    alone = [model.generate(_row(batch, i), rules, 10) for i in range(2)]
    assert out.lengths[0] == 4 and bool(out.stopped[0])
    assert out.tokens[0, :4].tolist() == free.tokens[0, :4].tolist()
    assert out.tokens[0, 4:].tolist() == [0] * 6 and out.probs[0, 4:].abs().sum() == 0
    n1 = int(out.lengths[1])
    assert out.tokens[1, :n1].tolist() == free.tokens[1, :n1].tolist()  # row 1 unaffected by row 0's stop
    for i, single in enumerate(alone):
        assert torch.equal(single.tokens[0], out.tokens[i])
        assert single.lengths.item() == out.lengths[i].item()
        assert single.stopped.item() == out.stopped[i].item()
        torch.testing.assert_close(single.probs[0], out.probs[i], atol=1e-5, rtol=1e-5)


def test_the_loop_stops_when_every_row_has_stopped() -> None:
    """Early stop: the loop runs no step after the last row's stop; without it, the whole budget."""
    model, batch, _, rules = _stopping_row_0_at_its_4th_token()
    steps: list[int] = []

    def counted(cache: KVCache, state: DecodeState, r: Rules) -> DecodeState:
        steps.append(int(state.step))
        return model.decode_step(cache, state, r)

    row = _row(batch, 0)  # 9 prompt tokens, two cameras
    with torch.inference_mode():
        cache = model.new_cache(1, model.prefix_length(2, 9) + 9)  # a budget of 10
        state = decode(model.prefill, counted, row, cache, rules)
        assert steps == [1, 2, 3] and finished(state, rules).lengths.tolist() == [4]  # g0 + 3 steps
        steps.clear()
        state = decode(model.prefill, counted, row, cache, rules, stop_early=False)
    assert steps == list(range(1, 10)) and finished(state, rules).lengths.tolist() == [4]
    assert state.tokens[0, 4:].tolist() == [0] * 6  # a stopped row writes padding


def test_prefill_and_decode_step_are_graphs_without_host_syncs() -> None:
    """prefill and decode_step trace whole (fullgraph: no data-dependent Python, no .item()), and
    the traced decode equals the eager one."""
    model = build(SIZES["tiny"]).eval()
    randomise(model, 6)
    batch = _inputs(3)
    rules = NEVER._replace(temperature=0.7)  # the sampling path too
    with torch.inference_mode():
        eager = finished(
            decode(model.prefill, model.decode_step, batch, model.new_cache(2, 2 * 64 + 9 + 4), rules), rules
        )
        prefill = torch.compile(model.prefill, backend="eager", fullgraph=True)
        step = torch.compile(model.decode_step, backend="eager", fullgraph=True)
        traced = finished(decode(prefill, step, batch, model.new_cache(2, 2 * 64 + 9 + 4), rules), rules)
    assert torch.equal(traced.tokens, eager.tokens)
    torch.testing.assert_close(traced.probs, eager.probs)


# ---- sampling --------------------------------------------------------------------------------------


def test_the_race_draws_each_token_with_its_probability() -> None:
    """argmax(p / E), E ~ Exp(1) from the hash, picks token i with probability p_i: frequencies
    over 20000 seeds within 4 standard errors; the noise is Exp(1) (mean 1, P(E > 1) = e^-1)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    p = torch.softmax(logits, 0)
    seeds = torch.tensor([row_key(s) for s in range(20000)])
    step = torch.tensor([3])
    token, prob = choose(logits.expand(len(seeds), -1), 1.0, seeds, step)
    freq = torch.bincount(token, minlength=6).double() / len(seeds)
    error = (p.double() * (1 - p.double()) / len(seeds)).sqrt()
    assert bool(((freq - p.double()).abs() <= 4 * error + 1e-12).all()), (freq, p)
    torch.testing.assert_close(prob, p[token])  # the probability kept is the T = 1 softmax's
    noise = race_noise(seeds[:2000], step, 64).double()
    assert (
        abs(noise.mean().item() - 1.0) < 0.01
        and abs((noise > 1).double().mean().item() - math.exp(-1)) < 0.01
    )
    # a different step or seed is a different draw; the same is the same
    assert torch.equal(race_noise(seeds[:4], step, 64), race_noise(seeds[:4], step.clone(), 64))
    assert not torch.equal(race_noise(seeds[:4], step, 64), race_noise(seeds[:4], step + 1, 64))
    assert row_key(2**63 - 1) != row_key(2**31 - 1) and 0 <= row_key(2**63 - 1) < 2**32


def test_temperature_sampling_follows_each_rows_seed() -> None:
    model = build(SIZES["tiny"]).eval()
    randomise(model, 7)
    batch = _inputs(4)
    greedy = model.generate(batch, NEVER, 6)
    cold = model.generate(batch, NEVER._replace(temperature=1e-4), 6)
    hot = NEVER._replace(temperature=5.0)
    runs = [
        model.generate(batch._replace(seeds=torch.tensor([row_key(a), row_key(b)])), hot, 6)
        for a, b in ((1, 2), (1, 2), (3, 2))
    ]
    assert torch.equal(cold.tokens, greedy.tokens)  # T -> 0 is greedy
    assert torch.equal(runs[0].tokens, runs[1].tokens)  # the seeds decide
    assert not torch.equal(runs[0].tokens[0], runs[2].tokens[0])  # row 0's seed changed
    assert torch.equal(runs[0].tokens[1], runs[2].tokens[1])  # row 1's did not: its draw did not change
    assert not torch.equal(runs[0].tokens, greedy.tokens)
    alone = model.generate(_row(batch._replace(seeds=torch.tensor([row_key(1), row_key(2)])), 1), hot, 6)
    assert torch.equal(alone.tokens[0], runs[0].tokens[1])  # a row draws the same alone as in a batch
