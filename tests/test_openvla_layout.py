"""The real-size OpenVLA 7B layout, on the meta device (no memory, no weights).

Proves: the tensors our loader reads (through the checkpoint name map) plus the ones it knowingly
skips (each tower's last block and final norm, SigLIP's attention-pool head: never run) are exactly
the tensor names and shapes of the published openvla/openvla-7b checkpoint; the published
config.json (which names its towers only by timm id) parses to the "7b" size; and every timm id of
the tower table has the size transformers gives the same architecture.

The expected layout is derived independently of our model code:
  * language_model.*: transformers' LlamaForCausalLM built on meta from the Llama-2-7b
    hyper-parameters (4096 wide, 32 layers, 32 heads, 11008 MLP) with the 32000 + 64 vocab,
    prefixed "language_model." as PrismaticForConditionalGeneration stores it.
  * vision_backbone.featurizer / fused_featurizer: the parameter names timm's
    VisionTransformer gives vit_large_patch14_reg4_dinov2 (embed 1024, depth 24, 16 heads,
    MLP 4096, 4 registers, class token, LayerScale, no_embed_class) and
    vit_so400m_patch14_siglip_224 (embed 1152, depth 27, MLP int(1152 * 3.7362) = 4304, no
    class token, "map" attention-pool head), at img_size 224 / patch 14 -> 256 patches, with
    LayerScale `gamma` renamed `scale_factor` (modeling_prismatic.ls_apply_patch), written out
    below from those definitions; their sizes are cross-checked against transformers'
    Dinov2WithRegistersModel and SiglipVisionModel of the same hyper-parameters.
  * projector.fc1/fc2/fc3: PrismaticProjector (fused): 2176 -> 8704 -> 4096 -> 4096, with biases.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import transformers
from transformers import (
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tests.helpers.reference import checkpoint_shapes
from vla_inference.models.common.vit import FINAL, VisionTower
from vla_inference.models.common.weights import NameMap
from vla_inference.models.openvla.checkpoint import openvla_names, parse_config
from vla_inference.models.openvla.model import TIMM_TOWERS, OpenVLA, OpenVLAConfig

Shapes = dict[str, tuple[int, ...]]


def _timm_vit(prefix: str, width: int, depth: int, mlp: int, dino: bool) -> Shapes:
    out: Shapes = {}
    if dino:
        out[prefix + "cls_token"] = (1, 1, width)
        out[prefix + "reg_token"] = (1, 4, width)
    out[prefix + "pos_embed"] = (
        1,
        256,
        width,
    )  # (224 / 14)^2; no class slot (no_embed_class / no class token)
    out[prefix + "patch_embed.proj.weight"] = (width, 3, 14, 14)
    out[prefix + "patch_embed.proj.bias"] = (width,)
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        out |= {b + "norm1.weight": (width,), b + "norm1.bias": (width,)}
        out |= {b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,)}
        out |= {b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,)}
        out |= {b + "norm2.weight": (width,), b + "norm2.bias": (width,)}
        out |= {b + "mlp.fc1.weight": (mlp, width), b + "mlp.fc1.bias": (mlp,)}
        out |= {b + "mlp.fc2.weight": (width, mlp), b + "mlp.fc2.bias": (width,)}
        if dino:
            out |= {b + "ls1.scale_factor": (width,), b + "ls2.scale_factor": (width,)}
    out |= {prefix + "norm.weight": (width,), prefix + "norm.bias": (width,)}
    if not dino:
        p = prefix + "attn_pool."
        out[p + "latent"] = (1, 1, width)
        out |= {p + "q.weight": (width, width), p + "q.bias": (width,)}
        out |= {p + "kv.weight": (2 * width, width), p + "kv.bias": (2 * width,)}
        out |= {p + "proj.weight": (width, width), p + "proj.bias": (width,)}
        out |= {p + "norm.weight": (width,), p + "norm.bias": (width,)}
        out |= {p + "mlp.fc1.weight": (mlp, width), p + "mlp.fc1.bias": (mlp,)}
        out |= {p + "mlp.fc2.weight": (width, mlp), p + "mlp.fc2.bias": (width,)}
    return out


def _expected() -> Shapes:
    expected = _timm_vit("vision_backbone.featurizer.", 1024, 24, 4096, dino=True)
    expected |= _timm_vit("vision_backbone.fused_featurizer.", 1152, 27, 4304, dino=False)
    expected |= {
        "projector.fc1.weight": (8704, 2176),
        "projector.fc1.bias": (8704,),
        "projector.fc2.weight": (4096, 8704),
        "projector.fc2.bias": (4096,),
        "projector.fc3.weight": (4096, 4096),
        "projector.fc3.bias": (4096,),
    }
    with torch.device("meta"):
        llama = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=32064,
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                tie_word_embeddings=False,
            )
        )
    expected |= {"language_model." + k: tuple(v.shape) for k, v in llama.state_dict().items()}
    return expected


def _count(shapes: Shapes) -> int:
    total = 0
    for shape in shapes.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def reads_exactly(model: torch.nn.Module, names: NameMap, expected: Shapes) -> set[str]:
    """Assert that `model` reads, through `names`, exactly the `expected` tensors with their shapes,
    less those the map skips (never allocated); return the skipped keys."""
    ours = checkpoint_shapes(names, model)
    skipped = {k for k in expected if names.unused(k)}
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours) - skipped) == []
    assert not skipped & set(ours)
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    params = sum(p.numel() for p in model.parameters())
    assert params == _count(expected) - _count({k: expected[k] for k in skipped})
    return skipped


def test_7b_reads_the_published_layout_and_skips_only_what_it_never_runs() -> None:
    cfg = OpenVLAConfig.named("7b")
    with torch.device("meta"):
        model = OpenVLA(cfg)
    expected = _expected()
    skipped = reads_exactly(model, openvla_names(cfg), expected)
    dino, siglip = "vision_backbone.featurizer.", "vision_backbone.fused_featurizer."
    assert skipped == {
        k
        for k in expected
        if k.startswith(
            (
                dino + "blocks.23.",
                dino + "norm.",
                siglip + "blocks.26.",
                siglip + "norm.",
                siglip + "attn_pool.",
            )
        )
    }
    params = sum(p.numel() for p in model.parameters())
    assert 7.5e9 < _count(expected) < 7.6e9  # "OpenVLA 7B": 7.54 B with both full towers and the padded vocab
    assert params > 7.4e9  # about 0.08 B are never allocated


def test_tower_sizes_agree_with_transformers() -> None:
    ours = _expected()
    dino = _count({k: v for k, v in ours.items() if k.startswith("vision_backbone.featurizer.")})
    siglip = _count({k: v for k, v in ours.items() if k.startswith("vision_backbone.fused_featurizer.")})
    with torch.device("meta"):
        hf_dino = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                mlp_ratio=4,
                image_size=224,
                patch_size=14,
                num_register_tokens=4,
            )
        )
        hf_siglip = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=1152,
                intermediate_size=4304,
                num_hidden_layers=27,
                num_attention_heads=16,
                image_size=224,
                patch_size=14,
            )
        )
    # HF DINOv2 also has a mask token and a class-token position embedding (2 x 1024) that timm's lacks.
    assert sum(p.numel() for p in hf_dino.parameters()) == dino + 2 * 1024
    assert sum(p.numel() for p in hf_siglip.parameters()) == siglip


def _hf_tower_params(timm_id: str, size: int) -> int:
    cfg = TIMM_TOWERS[timm_id]
    with torch.device("meta"):
        if "dinov2" in timm_id:
            common = dict(
                hidden_size=cfg.width,
                num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.num_heads,
                mlp_ratio=4,
                image_size=size,
                patch_size=14,
                use_swiglu_ffn=cfg.act == "swiglu",
            )
            if cfg.reg_tokens:
                model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **common))
            else:
                model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
            # HF also has a mask token, and a class-token position even with registers (timm has not)
            extra = cfg.width + (cfg.width if cfg.reg_tokens else 0)
        else:
            model = SiglipVisionModel(
                SiglipVisionConfig(
                    hidden_size=cfg.width,
                    intermediate_size=cfg.mlp_dim,
                    num_hidden_layers=cfg.depth,
                    num_attention_heads=cfg.num_heads,
                    image_size=size,
                    patch_size=cfg.patch_size,
                    vision_use_head=False,
                )
            )
            extra = 0
    return sum(p.numel() for p in model.parameters()) - extra


@pytest.mark.parametrize("timm_id", sorted(TIMM_TOWERS))
def test_every_timm_tower_has_the_transformers_size(timm_id: str) -> None:
    """Each table entry, built whole (all blocks + final norm) at its image size, has the parameter
    count of transformers' model of that architecture (DINOv2 at 224 px as Prismatic uses it)."""
    size = 224 if "dinov2" in timm_id else TIMM_TOWERS[timm_id].image_size
    with torch.device("meta"):
        tower = VisionTower(replace(TIMM_TOWERS[timm_id], image_size=size, output=FINAL))
    assert sum(p.numel() for p in tower.parameters()) == _hf_tower_params(timm_id, size)


def test_prismatic_384px_backbone_parses() -> None:
    """dinosiglip-vit-so-384px: both towers at 384 px, 27 x 27 = 729 patches each."""
    published = {
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_384"],
        "image_sizes": [384, 384],
        "text_config": {"model_type": "llama", "vocab_size": 32064},
        "use_fused_vision_backbone": True,
    }
    cfg = parse_config(published)
    assert cfg.num_patches == 729 and cfg.dino.image_size == cfg.siglip.image_size == 384


def test_published_config_parses_to_7b() -> None:
    published = {
        "arch_specifier": "no-align+fused-gelu-mlp",
        "architectures": ["OpenVLAForActionPrediction"],
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": "resize-naive",
        "image_sizes": [224, 224],
        "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": 2048,
        "model_type": "openvla",
        "n_action_bins": 256,
        "output_projector_states": False,
        "pad_to_multiple_of": 64,
        "pad_token_id": 32000,
        "text_config": {
            "model_type": "llama",
            "pad_token_id": 32000,
            "torch_dtype": "bfloat16",
            "vocab_size": 32064,
        },
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None],
        "torch_dtype": "bfloat16",
        "use_fused_vision_backbone": True,
        "vision_backbone_id": "dinosiglip-vit-so-224px",
    }
    cfg = parse_config(published)
    assert cfg == OpenVLAConfig.named("7b")
    assert cfg.action_vocab_size == 32000 and cfg.num_patches == 256 and cfg.vision_dim == 2176
