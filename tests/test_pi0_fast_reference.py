"""pi0-FAST's network and decoding against transformers' PaliGemma, on tiny random weights (fp32).

The reference is transformers' PaliGemmaForConditionalGeneration (SigLIP tower, projector, Gemma with
its scaled token embedding, untied LM head as LeRobot saves it), its weights copied through our
LeRobot name map, run without a cache over the whole sequence [images | prompt | decoded tokens]
with the prefix-LM mask written out here (prefix bidirectional among valid tokens, decoded tokens
causal) and positions = cumsum(valid) - 1. Our prefill + cached decode must pick the same greedy
tokens with the same probabilities; a batch must equal each of its rows alone.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from tests.helpers.reference import copy_from_reference, randomise
from vla_inference.models.pi0_fast import checkpoint as ckpt
from vla_inference.models.pi0_fast.model import (
    SIZES,
    DecodeState,
    Pi0FastConfig,
    Pi0FastModel,
    build,
    prefix_lm_mask,
)

PG = "model.paligemma_with_expert.paligemma."


def _reference(cfg: Pi0FastConfig, tied: bool) -> transformers.PaliGemmaForConditionalGeneration:
    hf = transformers.PaliGemmaConfig()
    text, vision = hf.text_config, hf.vision_config
    text.vocab_size = cfg.vocab_size
    text.hidden_size = cfg.text.width
    text.intermediate_size = cfg.text.mlp_dim
    text.num_attention_heads = cfg.text.num_heads
    text.num_key_value_heads = cfg.text.num_kv_heads
    text.head_dim = cfg.text.head_dim
    text.num_hidden_layers = cfg.text.depth
    text.hidden_activation = "gelu_pytorch_tanh"
    vision.hidden_size = cfg.vision.width
    vision.intermediate_size = cfg.vision.mlp_dim
    vision.num_hidden_layers = cfg.vision.depth
    vision.num_attention_heads = cfg.vision.num_heads
    vision.patch_size = cfg.vision.patch_size
    vision.image_size = cfg.vision.image_size
    vision.projection_dim = cfg.text.width
    hf.tie_word_embeddings = tied
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
    cfg = Pi0FastConfig(SIZES["tiny"].vision, SIZES["tiny"].text, SIZES["tiny"].vocab_size, tied_lm_head=tied)
    model = build(cfg).eval()
    names = ckpt.lerobot_names(ckpt.EMBED_KEY, None if tied else ckpt.LM_HEAD_KEY)
    copy_from_reference(model, names, _in_lerobot_names(reference))
    return model


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows: different prompt lengths (right padding), the second camera missing in row 1."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 2, 3, 224, 224, generator=g) * 2 - 1
    image_masks = torch.tensor([[True, True], [True, False]])
    tokens = torch.randint(5, 600, (2, 9), generator=g)
    token_masks = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    tokens[1, 5:] = 0  # padding ids
    return {"images": images, "image_masks": image_masks, "tokens": tokens, "token_masks": token_masks}


def _reference_logits(
    reference: transformers.PaliGemmaForConditionalGeneration,
    inputs: dict[str, torch.Tensor],
    decoded: torch.Tensor,
    position_offset: int = 0,
) -> torch.Tensor:
    """Logits (B, n, V) predicting decoded[:, 0..n-1] from one uncached pass over
    [images | prompt | decoded[:, :-1]]."""
    B, N = inputs["image_masks"].shape
    feats = [
        reference.model.get_image_features(pixel_values=inputs["images"][:, i]).pooler_output
        for i in range(N)
    ]
    patches = feats[0].shape[1]
    text = reference.model.language_model.embed_tokens(torch.cat([inputs["tokens"], decoded[:, :-1]], dim=1))
    embeds = torch.cat([*feats, text], dim=1)
    prefix_valid = torch.cat([inputs["image_masks"].repeat_interleave(patches, 1), inputs["token_masks"]], 1)
    P, n = prefix_valid.shape[1], decoded.shape[1]
    valid = torch.cat([prefix_valid, torch.ones(B, n - 1, dtype=torch.bool)], 1)
    T = P + n - 1
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    in_prefix = torch.arange(T) < P
    rule = in_prefix[None, :] | causal  # keys in the prefix, or earlier decoded tokens
    mask = rule[None] & valid[:, None, :] & valid[:, :, None] | torch.eye(T, dtype=torch.bool)
    positions = torch.cumsum(valid.long(), 1) - 1
    positions[:, P:] += position_offset
    hidden = reference.model.language_model(
        inputs_embeds=embeds, attention_mask=mask[:, None], position_ids=positions
    ).last_hidden_state
    last_prefix = torch.where(prefix_valid, torch.arange(P), -1).amax(1)
    rows = hidden[torch.arange(B), last_prefix][:, None]
    return reference.lm_head(torch.cat([rows, hidden[:, P:]], 1))


@pytest.mark.parametrize(("tied", "offset"), [(False, 0), (True, 1)])
def test_cached_decode_equals_full_recompute(tied: bool, offset: int) -> None:
    reference = _reference(SIZES["tiny"], tied)
    model = _ours(reference, tied)
    inputs = _inputs()
    with torch.no_grad():
        out = model.generate(**inputs, budget=8, stop_token=-1, position_offset=offset)
        logits = _reference_logits(reference, inputs, out.tokens, offset)
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
    inputs = _inputs(1)
    valid = torch.ones(1, 6, dtype=torch.bool)
    mask = prefix_lm_mask(valid)
    assert mask.shape == (1, 1, 6, 6) and bool(mask.all())
    padded = prefix_lm_mask(torch.tensor([[True, True, False]]))[0, 0]
    assert padded.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    with torch.no_grad():
        first = model.generate(**inputs, budget=2, stop_token=-1)
        changed = dict(inputs, tokens=inputs["tokens"].clone())
        changed["tokens"][0, -1] += 1  # the last valid prompt token of row 0 only
        second = model.generate(**changed, budget=2, stop_token=-1)
    assert not torch.allclose(first.probs[0], second.probs[0])
    torch.testing.assert_close(first.probs[1], second.probs[1])  # row 1 untouched


def _row(inputs: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Row i alone, its prompt trimmed to its own valid tokens (no padding at all)."""
    n = int(inputs["token_masks"][i].sum())
    return {
        "images": inputs["images"][i : i + 1],
        "image_masks": inputs["image_masks"][i : i + 1],
        "tokens": inputs["tokens"][i : i + 1, :n],
        "token_masks": inputs["token_masks"][i : i + 1, :n],
    }


def test_batch_equals_each_row_alone_with_independent_stops() -> None:
    torch.manual_seed(0)
    model = build(SIZES["tiny"]).eval()
    randomise(model, 5)
    inputs = _inputs(2)
    with torch.no_grad():
        free = model.generate(**inputs, budget=10, stop_token=-1)
        # stop row 0 at its 4th token (a token row 1 does not produce first)
        stop = int(free.tokens[0, 3])
        assert stop not in free.tokens[0, :3].tolist()
        batch = model.generate(**inputs, budget=10, stop_token=stop, pad_token=0)
        alone = [model.generate(**_row(inputs, i), budget=10, stop_token=stop, pad_token=0) for i in range(2)]
    assert batch.lengths[0] == 4 and bool(batch.stopped[0])
    assert batch.tokens[0, :4].tolist() == free.tokens[0, :4].tolist()
    assert batch.tokens[0, 4:].tolist() == [0] * 6 and batch.probs[0, 4:].abs().sum() == 0
    n1 = int(batch.lengths[1])
    assert batch.tokens[1, :n1].tolist() == free.tokens[1, :n1].tolist()  # row 1 unaffected by row 0's stop
    for i, single in enumerate(alone):
        assert torch.equal(single.tokens[0], batch.tokens[i])
        assert single.lengths.item() == batch.lengths[i].item()
        assert single.stopped.item() == batch.stopped[i].item()
        torch.testing.assert_close(single.probs[0], batch.probs[i], atol=1e-5, rtol=1e-5)


def test_decode_step_is_one_graph_without_host_syncs() -> None:
    """decode_step traces whole (fullgraph: no data-dependent Python, no .item()) and the traced
    step equals the eager one."""
    model = build(SIZES["tiny"]).eval()
    randomise(model, 6)
    inputs = _inputs(3)
    with torch.no_grad():
        B, P = 2, 2 * model.cfg.vision.num_patches + inputs["tokens"].shape[1]
        cache = model.text.new_cache(B, P + 3, model.text.embed_tokens.weight)
        logits, pad = model.prefill(**inputs, cache=cache)
        state = DecodeState(
            logits.argmax(-1),
            pad.sum(1),
            torch.tensor([P]),
            torch.nn.functional.pad(pad, (0, 3)),
            torch.zeros(B, dtype=torch.bool),
        )
        k, v = cache.k.clone(), cache.v.clone()
        eager = model.decode_step(cache.k, cache.v, state, stop_token=7, pad_token=0)
        compiled = torch.compile(model.decode_step, backend="eager", fullgraph=True)
        traced = compiled(k, v, state, stop_token=7, pad_token=0)
    assert torch.equal(traced.token, eager.token)
    torch.testing.assert_close(traced.prob, eager.prob)
    torch.testing.assert_close(k, cache.k)  # the traced step wrote the same column in place
    assert traced.state.column.item() == P + 1 and bool(traced.state.keys[:, P].all())


def test_temperature_sampling() -> None:
    model = build(SIZES["tiny"]).eval()
    randomise(model, 7)
    inputs = _inputs(4)
    with torch.no_grad():
        greedy = model.generate(**inputs, budget=6, stop_token=-1)
        cold = model.generate(
            **inputs, budget=6, stop_token=-1, temperature=1e-4, generator=torch.Generator().manual_seed(0)
        )
        runs = [
            model.generate(
                **inputs, budget=6, stop_token=-1, temperature=5.0, generator=torch.Generator().manual_seed(s)
            )
            for s in (1, 1, 2)
        ]
    assert torch.equal(cold.tokens, greedy.tokens)  # T -> 0 is greedy
    assert torch.equal(runs[0].tokens, runs[1].tokens)  # the generator decides
    assert not torch.equal(runs[0].tokens, runs[2].tokens)
    assert not torch.equal(runs[0].tokens, greedy.tokens)
