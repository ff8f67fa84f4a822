"""OpenVLA-OFT's parallel decoding against an independent reference, tiny random weights, fp32.

The reference is upstream's predict_action for ONE robot (modeling_prismatic.py at moojink/openvla-oft
213c5ff), written out here from its description, with transformers' Llama for the language model:
input ids = prompt + chunk*D placeholder ids (1) + the stop id (2); the placeholders' embeddings
multiplied by zero (the stop token's kept); the projected patches of each image, in order, then the proprio
token, spliced in after BOS; transformers' LlamaModel with a 4D all-zero additive mask (the fork's
bidirectional attention) and its default positions 0..T-1; hidden states sliced at
[NUM_PATCHES + NUM_PROMPT_TOKENS, + chunk*D) as upstream does; the head and projector as F.* formulas on
the state dict. The towers' features come from our towers (checked against transformers in
test_openvla_reference.py).

Proves: our batched forward (left padding inside the text, per-row RoPE positions, the mask over valid
keys) gives every row of a mixed batch its single-robot reference answer; a batch equals its rows run
one by one and with extra static padding; the head, projector and the normalisers built from the dataset
statistics (the shared `bounds` convention) follow upstream's formulas; the forward traces in one graph
(no host syncs).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from tests.helpers.openvla_checkpoints import init_weights
from tests.test_openvla_reference import hf_llama_config
from vla_inference.models.base import ModelLoadError
from vla_inference.models.openvla.checkpoint import openvla_names
from vla_inference.models.openvla.oft import OFTBatch, OFTConfig, OpenVLAOFT
from vla_inference.models.openvla.oft_checkpoint import BOUNDS, BOUNDS_Q99, bounds_normalizer

TINY = OFTConfig.named("tiny")
TOL = {"rtol": 1e-5, "atol": 1e-5}
PROMPTS = [
    torch.tensor([1, 40, 41, 42, 43, 44, 45, 29871]),
    torch.tensor([1, 50, 29871]),
    torch.tensor([1, 60, 61, 62, 63, 29871]),
]


def _model(seed: int = 0) -> OpenVLAOFT:
    model = OpenVLAOFT(TINY).eval()
    init_weights(model, seed)
    return model


def _observations(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = TINY.vla.dino.image_size
    pixels = torch.randn(batch, TINY.num_images, 6, size, size, generator=g)  # (B, I, 6, S, S)
    proprio = torch.rand(batch, TINY.proprio_dim, generator=g) * 2 - 1  # (B, P)
    return pixels, proprio


def _inputs(
    model: OpenVLAOFT,
    pixels: torch.Tensor,
    proprio: torch.Tensor,
    prompts: list[torch.Tensor],
    text_len: int | None = None,
) -> OFTBatch:
    return OFTBatch(model.layout(pixels, prompts, text_len), proprio)


def _hf_llama(model: OpenVLAOFT) -> transformers.LlamaModel:
    hf = transformers.LlamaModel(hf_llama_config(TINY.vla)).eval()
    tensors = openvla_names(TINY.vla).to_checkpoint({k: v for k, v in model.state_dict().items()})
    prefix = "language_model.model."
    hf.load_state_dict(
        {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}, strict=True
    )
    return hf


def _reference(
    model: OpenVLAOFT,
    hf: transformers.LlamaModel,
    pixels: torch.Tensor,
    proprio: torch.Tensor,
    prompt: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One robot as upstream's predict_action: -> hidden states (n, W) and normalised actions (chunk, D)."""
    sd = model.state_dict()
    n = TINY.num_action_tokens
    with torch.no_grad():
        features = [
            torch.cat([model.dino(img[None, :3]), model.siglip(img[None, 3:])], dim=2)[0] for img in pixels
        ]
        h = torch.cat(features)  # (I*N, Wv): image 0's patches, then image 1's
        h = F.gelu(F.linear(h, sd["projector.fc1.weight"], sd["projector.fc1.bias"]))
        h = F.gelu(F.linear(h, sd["projector.fc2.weight"], sd["projector.fc2.bias"]))
        patches = F.linear(h, sd["projector.fc3.weight"], sd["projector.fc3.bias"])
        p = F.gelu(F.linear(proprio, sd["proprio_projector.fc1.weight"], sd["proprio_projector.fc1.bias"]))
        proprio_token = F.linear(p, sd["proprio_projector.fc2.weight"], sd["proprio_projector.fc2.bias"])
        ids = torch.cat([prompt, torch.ones(n, dtype=torch.long), torch.tensor([2])])
        action_mask = torch.zeros(len(ids), dtype=torch.bool)
        action_mask[len(prompt) : len(prompt) + n] = True  # labels > 31743: the placeholders, not the stop
        embeds = sd["llm.embed_tokens.weight"][ids] * ~action_mask[:, None]
        seq = torch.cat([embeds[:1], patches, proprio_token[None], embeds[1:]])  # (T, W)
        T = seq.shape[0]
        out = hf(inputs_embeds=seq[None], attention_mask=torch.zeros(1, 1, T, T)).last_hidden_state[0]
        num_patches = patches.shape[0] + 1  # + the proprio token
        start = num_patches + len(prompt) - 1  # NUM_PATCHES + NUM_PROMPT_TOKENS
        hidden = out[start : start + n]  # (n, W)
        x = hidden.reshape(TINY.chunk_size, -1)  # (chunk, D*W)
        w = {k.removeprefix("action_head.model."): v for k, v in sd.items() if k.startswith("action_head.")}
        width = x.shape[1]
        x = F.layer_norm(x, (width,), w["layer_norm1.weight"], w["layer_norm1.bias"])
        x = F.relu(F.linear(x, w["fc1.weight"], w["fc1.bias"]))
        for i in range(TINY.head_blocks):
            b = f"mlp_resnet_blocks.{i}.ffn."
            y = F.layer_norm(x, (x.shape[1],), w[b + "0.weight"], w[b + "0.bias"])
            x = x + F.relu(F.linear(y, w[b + "1.weight"], w[b + "1.bias"]))
        x = F.layer_norm(x, (x.shape[1],), w["layer_norm2.weight"], w["layer_norm2.bias"])
        actions = F.linear(x, w["fc2.weight"], w["fc2.bias"])
    return hidden, actions


def test_mixed_batch_matches_the_single_robot_reference() -> None:
    model = _model(seed=1)
    hf = _hf_llama(model)
    pixels, proprio = _observations(len(PROMPTS), seed=2)
    inputs = _inputs(model, pixels, proprio, PROMPTS)
    assert inputs.prompts.text_valid.sum(1).tolist() == [7, 2, 5]  # left padding differs per row
    with torch.no_grad():
        hidden = model.action_hidden(inputs)
        actions = model(inputs)
    assert actions.shape == (3, TINY.chunk_size, TINY.action_dim) and actions.dtype == torch.float32
    for row, prompt in enumerate(PROMPTS):
        ref_hidden, ref_actions = _reference(model, hf, pixels[row], proprio[row], prompt)
        torch.testing.assert_close(hidden[row], ref_hidden, **TOL)
        torch.testing.assert_close(actions[row], ref_actions, **TOL)
    assert actions.std() > 0.05  # the rows differ: nothing constant passes


def test_reference_is_bidirectional_and_sees_the_proprio() -> None:
    """The answer depends on tokens after the action positions' predecessors (the stop token) and on the
    proprio token: a causal mask or a dropped proprio token would fail the reference comparison."""
    model = _model(seed=3)
    pixels, proprio = _observations(1, seed=4)
    base = _inputs(model, pixels, proprio, PROMPTS[:1])
    with torch.no_grad():
        ref = model(base)
        moved = model(_inputs(model, pixels, -proprio, PROMPTS[:1]))
        model.llm.embed_tokens.weight[TINY.stop_token_id] += 1.0  # only the last column changes
        stop = model(base)
    assert (ref - moved).abs().max() > 1e-3
    assert (ref - stop).abs().max() > 1e-3  # the first action position sees the stop token: bidirectional


def test_mixed_batch_equals_single_rows_and_static_padding() -> None:
    model = _model(seed=5)
    pixels, proprio = _observations(len(PROMPTS), seed=6)
    with torch.no_grad():
        batch = model(_inputs(model, pixels, proprio, PROMPTS))
        padded = model(_inputs(model, pixels, proprio, PROMPTS, text_len=16))  # a static runner's columns
        rows = [
            model(_inputs(model, pixels[i : i + 1], proprio[i : i + 1], [p])) for i, p in enumerate(PROMPTS)
        ]
    torch.testing.assert_close(batch, torch.cat(rows), **TOL)
    torch.testing.assert_close(padded, batch, **TOL)


def test_embedding_layout_zero_placeholders_real_stop() -> None:
    model = _model(seed=7)
    pixels, proprio = _observations(2, seed=8)
    inputs = _inputs(model, pixels, proprio, PROMPTS[:2])
    with torch.no_grad():
        embeds, valid = model.embed_sequence(inputs)
    n, Tp, Lt = TINY.num_action_tokens, TINY.prefix_len, inputs.prompts.text.shape[1]
    assert Tp == 1 + 2 * 16 + 1 and embeds.shape == (2, TINY.sequence_len(Lt), TINY.width)
    assert torch.count_nonzero(embeds[:, -1 - n : -1]) == 0  # placeholders
    table = model.llm.embed_tokens.weight
    torch.testing.assert_close(embeds[:, -1], table[2].expand(2, -1), rtol=0, atol=0)  # the stop token
    torch.testing.assert_close(embeds[:, 0], table[1].expand(2, -1), rtol=0, atol=0)  # BOS
    assert valid[1, Tp : Tp + Lt].tolist() == [False] * (Lt - 2) + [True] * 2  # padding sits inside the text
    assert valid[:, :Tp].all() and valid[:, Tp + Lt :].all()


def test_head_and_projector_follow_upstream_formulas() -> None:
    model = _model(seed=9)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(3, TINY.chunk_size, TINY.action_dim * TINY.width, generator=g)
    p = torch.randn(3, TINY.proprio_dim, generator=g)
    head = model.action_head.model
    with torch.no_grad():
        h = F.relu(
            head.fc1(F.layer_norm(x, (x.shape[-1],), head.layer_norm1.weight, head.layer_norm1.bias, 1e-5))
        )
        for block in head.mlp_resnet_blocks:
            ln, lin = block.ffn[0], block.ffn[1]
            h = h + F.relu(lin(F.layer_norm(h, (h.shape[-1],), ln.weight, ln.bias, 1e-5)))
        expected = head.fc2(
            F.layer_norm(h, (h.shape[-1],), head.layer_norm2.weight, head.layer_norm2.bias, 1e-5)
        )
        torch.testing.assert_close(model.action_head(x), expected, **TOL)
        proj = model.proprio_projector
        assert proj is not None
        erf_gelu = 0.5 * proj.fc1(p) * (1 + torch.erf(proj.fc1(p) / 2**0.5))
        torch.testing.assert_close(proj(p), proj.fc2(erf_gelu), **TOL)
    assert model.action_head.model.fc1.in_features == TINY.action_dim * TINY.width


def test_normalisers_follow_upstream_formulas() -> None:
    """dataset_statistics.json entries -> the shared normaliser (bounds convention, eps 1e-8) computes
    upstream's normalize_proprio and its un-normalisation (modeling_prismatic.py), q01/q99 and min/max."""
    entry = {"q01": [-1.0, 0.0, 2.0], "q99": [1.0, 4.0, 2.0], "mask": [True, True, False]}
    entry |= {"min": [-2.0, -1.0, 1.0], "max": [2.0, 5.0, 3.0]}
    q99 = bounds_normalizer(entry, BOUNDS_Q99, 3, "test")
    # 2 (x - low) / (high - low + 1e-8) - 1, clipped everywhere (the unmasked 3rd dim too)
    got = q99.normalize(np.array([0.5, 5.0, 7.0]))
    np.testing.assert_allclose(got, [3 / (2 + 1e-8) - 1, 1.0, 1.0], rtol=0, atol=1e-12)  # 0.5 - 0.75e-8
    np.testing.assert_allclose(q99.normalize(np.array([0.0, 1.0, -0.25])), [0.0, -0.5, -0.25], atol=1e-8)
    # 0.5 (a + 1) (high - low + 1e-8) + low where the mask holds, never clipped; the gripper passes through
    actions = np.array([[0.0, 1.0, 0.3], [-1.0, 0.5, -1.7]])
    expected = [[0.0 + 0.5e-8, 4.0 + 1e-8, 0.3], [-1.0, 3.0 + 0.75e-8, -1.7]]
    np.testing.assert_allclose(q99.unnormalize(actions), expected, rtol=0, atol=1e-12)
    minmax = bounds_normalizer(entry, BOUNDS, 3, "test")  # ALOHA's: min/max
    np.testing.assert_allclose(
        minmax.unnormalize(np.array([0.0, 1.0, 0.3])), [0.5e-8, 5.0 + 1e-8, 0.3], rtol=0, atol=1e-12
    )
    with pytest.raises(ModelLoadError, match="must have 4 values"):
        bounds_normalizer(entry, BOUNDS_Q99, 4, "test")
    with pytest.raises(ModelLoadError, match="needs min, max"):
        bounds_normalizer({"q01": [0.0], "q99": [1.0]}, BOUNDS, 1, "test")


def test_layout_pads_left_and_refuses_overflow() -> None:
    model = _model(seed=13)
    pixels = torch.zeros(2, TINY.num_images, 6, 28, 28)
    batch = model.layout(pixels, [torch.tensor([1, 7, 8]), torch.tensor([1])], width=3)
    assert batch.bos.tolist() == [[1], [1]]
    pad = TINY.vla.pad_token_id
    assert batch.text.tolist() == [[pad, 7, 8], [pad, pad, pad]]
    assert batch.text_valid.tolist() == [[False, True, True], [False] * 3]
    with pytest.raises(ValueError, match="exceeds"):
        model.layout(pixels[:1], [torch.tensor([1, 2, 3, 4])], width=2)


def test_forward_traces_as_one_graph() -> None:
    """fullgraph=True fails on any graph break (a .item(), a data-dependent shape, a host sync)."""
    model = _model(seed=11)
    pixels, proprio = _observations(2, seed=12)
    inputs = _inputs(model, pixels, proprio, PROMPTS[:2], text_len=8)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs), model(inputs), **TOL)
