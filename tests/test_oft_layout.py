"""The real-size OpenVLA-OFT LIBERO layout, on the meta device (no memory, no weights).

Proves: what our loader reads for OFTConfig.named("libero") (through oft_names) is exactly the published
OpenVLA 7B layout (test_openvla_layout's independently derived expectation: transformers' Llama-2 7B + timm's
towers + the fused projector) plus the LIBERO head and proprio projector as upstream defines them, less
the tensors we knowingly never build (each tower's last block and final norm, SigLIP's pooling head, and
lm_head: OFT reads hidden states). The head and projector shapes are written out from upstream's
definitions (prismatic/models/action_heads.py, projectors.py at moojink/openvla-oft 213c5ff) with W = 4096
(Llama-2 7B), D = 7, P = 8, as converted (DDP's `module.` stripped).
"""

from __future__ import annotations

import torch

from tests.test_openvla_layout import _count, _expected, reads_exactly
from vla_inference.models.openvla.oft import OFTBatch, OFTConfig, OpenVLAOFT
from vla_inference.models.openvla.oft_checkpoint import oft_names

W, D, P = 4096, 7, 8


def _head() -> dict[str, tuple[int, ...]]:
    """L1RegressionActionHead(input_dim=W, hidden_dim=W, action_dim=D): MLPResNet(2, W * D, W, D)."""
    out: dict[str, tuple[int, ...]] = {
        "model.layer_norm1.weight": (W * D,),
        "model.layer_norm1.bias": (W * D,),
        "model.fc1.weight": (W, W * D),
        "model.fc1.bias": (W,),
        "model.layer_norm2.weight": (W,),
        "model.layer_norm2.bias": (W,),
        "model.fc2.weight": (D, W),
        "model.fc2.bias": (D,),
    }
    for i in range(2):
        b = f"model.mlp_resnet_blocks.{i}.ffn."
        out |= {b + "0.weight": (W,), b + "0.bias": (W,), b + "1.weight": (W, W), b + "1.bias": (W,)}
    return out


def _projector() -> dict[str, tuple[int, ...]]:
    """ProprioProjector(llm_dim=W, proprio_dim=P)."""
    return {"fc1.weight": (W, P), "fc1.bias": (W,), "fc2.weight": (W, W), "fc2.bias": (W,)}


def test_libero_reads_the_published_layout() -> None:
    cfg = OFTConfig.named("libero")
    with torch.device("meta"):
        model = OpenVLAOFT(cfg)
    skipped = reads_exactly(model, oft_names(cfg), _expected() | _head() | _projector())
    assert "language_model.lm_head.weight" in skipped
    head = _count(_head())
    assert 151e6 < head < 152e6  # 28672 x 4096 fc1 dominates
    assert _count(_projector()) == 4096 * 8 + 4096 + 4096 * 4096 + 4096


def test_libero_sequence_layout() -> None:
    cfg = OFTConfig.named("libero")
    assert (cfg.chunk_size, cfg.action_dim, cfg.proprio_dim, cfg.num_images) == (8, 7, 8, 2)
    assert cfg.width == 4096 and cfg.vla.num_patches == 256
    assert cfg.prefix_len == 1 + 2 * 256 + 1  # BOS, two images' patches, the proprio token
    assert cfg.num_action_tokens == 56
    # "In: What action should the robot take to pick up the cup?\nOut:" is about 20 tokens after BOS
    assert cfg.sequence_len(20) == 514 + 20 + 56 + 1 <= cfg.vla.max_seq_len


def test_libero_forward_on_meta_gives_a_chunk_per_robot() -> None:
    """The whole real-size step (two images per robot through both towers, the proprio token, 56 zero
    placeholders, the bidirectional Llama, the head) composes for a batch of robots with different
    prompt lengths, without memory: shapes only."""
    cfg = OFTConfig.named("libero")
    with torch.device("meta"):
        model = OpenVLAOFT(cfg)
        pixels = torch.empty(3, 2, 6, 224, 224)
        proprio = torch.empty(3, 8)
    prompts = [torch.ones(n, dtype=torch.long) for n in (21, 30, 17)]
    batch = OFTBatch(model.layout(pixels, prompts), proprio)
    assert batch.prompts.text.shape == (3, 29)  # the longest prompt after BOS
    with torch.inference_mode():
        embeds, valid = model.embed_sequence(batch)
        actions = model(batch)
    assert embeds.shape == (3, cfg.sequence_len(29), 4096) == (3, 514 + 29 + 56 + 1, 4096)
    assert valid.shape == embeds.shape[:2]
    assert actions.shape == (3, 8, 7) and actions.dtype == torch.float32
