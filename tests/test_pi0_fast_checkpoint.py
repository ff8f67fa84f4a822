"""Loading a tiny pi0-FAST checkpoint in LeRobot's on-disk format through the real loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import pi0_fast_checkpoints as helpers
from vla_inference.models.base import ModelLoadError
from vla_inference.models.pi0_fast import checkpoint as ckpt
from vla_inference.models.pi0_fast.fast_tokenizer import FastTokenizer
from vla_inference.models.pi0_fast.model import SIZES, Pi0FastBatch, Rules
from vla_inference.models.pi0_fast.prompt import TextTokenizer, decode_prefix, tokenize_prompt


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return helpers.write_tiny_checkpoint(tmp_path_factory.mktemp("pi0fast") / "ckpt", seed=3)


@pytest.fixture
def copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "ckpt"))


def test_loads_config_weights_tokenizers_and_stats(source: Path) -> None:
    checkpoint = ckpt.load(source)
    assert checkpoint.config == SIZES["tiny"]  # vision found from the shapes, untied LM head
    assert (checkpoint.state_dim, checkpoint.action_dim) == (5, 3)
    assert (checkpoint.chunk_size, checkpoint.n_action_steps, checkpoint.max_decoding_steps) == (10, 10, 64)
    assert checkpoint.tokenizer_max_length == 48 and checkpoint.fast_skip_tokens == 128
    assert checkpoint.image_slots == ("base_0_rgb", "left_wrist_0_rgb")
    assert checkpoint.norms is not None
    stats = helpers.tiny_stats(5, 3)
    for normalizer, feature in zip(checkpoint.norms, ("observation.state", "action"), strict=True):
        # LeRobot's MEAN_STD, in float32 (the shared normaliser's LeRobot convention), its eps
        assert (normalizer.mode, normalizer.convention, normalizer.eps) == ("mean_std", "lerobot", 1e-8)
        assert normalizer.precision is np.float32
        for name in ("mean", "std"):
            np.testing.assert_allclose(getattr(normalizer.stats, name), stats[feature][name], rtol=1e-6)
    model = ckpt.load_model(checkpoint, "cpu", torch.float32)
    tensors = load_file(str(source / "model.safetensors"))
    assert torch.equal(model.vlm.embed_tokens.weight, tensors[ckpt.EMBED_KEY])
    assert model.lm_head is not None and torch.equal(model.lm_head.weight, tensors[ckpt.LM_HEAD_KEY])
    assert torch.equal(
        model.vision.blocks[1].attn.qkv.weight[32:64],
        tensors[ckpt.VISION + "encoder.layers.1.self_attn.k_proj.weight"],
    )
    text = TextTokenizer.load(checkpoint.text_tokenizer)
    assert (text.bos_id, text.eos_id, text.pad_id, text.vocab_size) == (2, 1, 0, 1024)
    fast = FastTokenizer.load(checkpoint.action_tokenizer)
    assert fast.vocab_size == 300
    assert not (checkpoint.action_tokenizer / helpers.EXECUTED_MARKER).exists()  # the .py never ran
    # the loaded pieces decode together
    tokens, mask = tokenize_prompt(
        text, "pick up the red block", np.zeros(5), checkpoint.tokenizer_max_length
    )
    tokens, mask = decode_prefix(tokens, mask, text.bos_id)
    batch = Pi0FastBatch(
        torch.zeros(1, 2, 3, 224, 224),
        torch.tensor([[True, False]]),
        torch.from_numpy(tokens)[None],
        torch.from_numpy(mask)[None],
        torch.zeros(1, dtype=torch.long),
    )
    out = model.generate(batch, Rules(text.token_id("|"), text.pad_id), 4)
    assert out.tokens.shape == (1, 4) and bool((out.probs[0, : int(out.lengths[0])] > 0).all())


def test_a_file_with_one_embedding_is_tied(copy: Path) -> None:
    tensors = load_file(str(copy / "model.safetensors"))
    head = tensors.pop(ckpt.EMBED_KEY)  # openpi-style files keep only lm_head.weight
    tensors[ckpt.LM_HEAD_KEY] = head * 2
    save_file(tensors, str(copy / "model.safetensors"))
    checkpoint = ckpt.load(copy)
    assert checkpoint.config.tied_lm_head
    model = ckpt.load_model(checkpoint, "cpu", torch.float32)
    assert model.lm_head is None and torch.equal(model.vlm.embed_tokens.weight, head * 2)


def test_missing_tokenizers_name_the_file_and_the_setting(copy: Path, tmp_path: Path) -> None:
    shutil.move(copy / "tokenizer", tmp_path / "text")
    with pytest.raises(ModelLoadError, match=r"missing tokenizer tokenizer.json .*VLA_TOKENIZER_PATH"):
        ckpt.load(copy)
    assert (
        ckpt.load(copy, tokenizer_path=str(tmp_path / "text")).text_tokenizer
        == tmp_path / "text" / "tokenizer.json"
    )
    shutil.move(copy / "action_tokenizer", tmp_path / "fast")
    with pytest.raises(ModelLoadError, match=r"missing FAST action tokenizer .*processor_config.json"):
        ckpt.load(copy, tokenizer_path=str(tmp_path / "text"))
    loaded = ckpt.load(
        copy, tokenizer_path=str(tmp_path / "text"), fast_tokenizer_path=str(tmp_path / "fast")
    )
    assert loaded.action_tokenizer == tmp_path / "fast"


def test_config_and_weight_problems_are_one_line_errors(copy: Path) -> None:
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, type="pi0")))
    with pytest.raises(ModelLoadError, match="type='pi0' is not a pi0_fast policy"):
        ckpt.load(copy)
    (copy / "config.json").write_text(json.dumps(dict(config, use_relative_actions=True)))
    with pytest.raises(ModelLoadError, match="use_relative_actions"):
        ckpt.load(copy)
    (copy / "config.json").write_text(json.dumps(dict(config, paligemma_variant="gemma_7b")))
    with pytest.raises(ModelLoadError, match="paligemma_variant='gemma_7b'"):
        ckpt.load(copy)
    (copy / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(copy / "model.safetensors"))
    del tensors[ckpt.LANGUAGE + "layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(copy / "model.safetensors"))
    checkpoint = ckpt.load(copy)
    with pytest.raises(ModelLoadError, match=r"missing 1: .*layers.2.mlp.up_proj.weight"):
        ckpt.load_model(checkpoint, "cpu", torch.float32)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"missing model\.safetensors"):
        ckpt.load(copy)
