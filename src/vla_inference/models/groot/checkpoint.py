"""Everything about the GR00T N1.5 checkpoint format: config, weights, metadata, tokenizer.

A checkpoint directory (as NVIDIA publishes nvidia/GR00T-N1.5-3B and as fine-tunes save it):

    config.json                      model_type "gr00t_n1_5", backbone_cfg, action_head_cfg
    model.safetensors | model-0000k-of-0000n.safetensors + model.safetensors.index.json
    experiment_cfg/metadata.json     per embodiment tag: statistics + modalities
    tokenizer.json                   Qwen3 tokenizer with the Eagle tokens (see TOKENIZER_HELP)

Only safetensors and JSON are read; nothing is unpickled or executed. `groot_names` maps our
parameter names to upstream's; the SigLIP pooling head, the LM head and the LM layers above
select_layer are in the files but never used: they are skipped, not allocated.

The Eagle backbone's own configuration is not in config.json: upstream reads it from the
Eagle files inside the gr00t package. We use the published N1.5 values (model.SIZES["n1.5-3b"]),
unless `backbone_cfg.eagle_config` holds an Eagle config dict (text_config / vision_config /
use_pixel_shuffle / mlp_connector_layers / downsample_ratio / force_image_size /
image_token_index, the same keys as upstream's eagle2_hg_model/config.json), or the checkpoint
directory has an `eagle_config.json` with those keys. Tiny test checkpoints use that.

experiment_cfg/metadata.json (per-embodiment statistics and modalities) and the data configs
that choose what is served are read by embodiments.py / data_configs.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common import vit
from vla_inference.models.common.tokenizers import find_tokenizer as find_file
from vla_inference.models.common.weights import NameMap, Source, find_weight_files, load_weights, read_json
from vla_inference.models.groot.action_head import ActionHeadConfig
from vla_inference.models.groot.model import GR00TN15, SIZES, EagleConfig, GrootConfig

N = TypeVar("N", bound=torch.nn.Module)

MODEL_TYPE = "gr00t_n1_5"
_EAGLE = "backbone.eagle_model."
_VISION = _EAGLE + "vision_model.vision_model."
_LM = _EAGLE + "language_model."

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_HELP = (
    "GR00T needs the Eagle 2.5 / Qwen3 tokenizer as tokenizer.json. Upstream keeps it in the gr00t "
    "package (gr00t/model/backbone/eagle2_hg_model: vocab.json, merges.txt, added_tokens.json); "
    "convert it once with transformers: AutoTokenizer.from_pretrained(<that folder>)"
    ".save_pretrained(<checkpoint dir>), then put tokenizer.json in the checkpoint directory "
    "or point VLA_TOKENIZER_PATH at it"
)
IMAGE_CONTEXT_TOKEN = "<IMG_CONTEXT>"
REQUIRED_TOKENS = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", IMAGE_CONTEXT_TOKEN)


# ----------------------------------------------------------------------------------------------
# config


def config_from_json(raw: Mapping[str, Any], eagle: Mapping[str, Any] | None = None) -> GrootConfig:
    """config.json (+ optional Eagle config) -> GrootConfig: the published N1.5 sizes, with every
    value the files give replaced."""
    if raw.get("model_type") != MODEL_TYPE:
        raise ModelLoadError(
            f"config.json has model_type {raw.get('model_type')!r}; "
            f"this backend serves GR00T N1.5 ({MODEL_TYPE!r})"
        )
    backbone_cfg = dict(raw.get("backbone_cfg") or {})
    head_cfg = dict(raw.get("action_head_cfg") or {})
    dit_cfg = dict(head_cfg.get("diffusion_model_cfg") or {})
    vlsa_cfg = dict(head_cfg.get("vl_self_attention_cfg") or {})
    eagle = eagle if eagle is not None else backbone_cfg.get("eagle_config")
    published = SIZES["n1.5-3b"]
    backbone = published.backbone
    if eagle:
        backbone = _eagle_config(backbone, eagle)
    backbone = replace(
        backbone,
        select_layer=backbone_cfg.get("select_layer", backbone.select_layer),
        project_to_dim=backbone_cfg.get("project_to_dim"),
    )
    head = replace(
        published.head,
        **_given(
            head_cfg,
            {f.name: f.name for f in fields(ActionHeadConfig) if f.name not in ("dit", "vl_adapter")},
        ),
        dit=replace(
            published.head.dit,
            **_given(
                dit_cfg,
                {
                    "heads": "num_attention_heads",
                    "head_dim": "attention_head_dim",
                    "layers": "num_layers",
                    "output_dim": "output_dim",
                    "cross_attention_dim": "cross_attention_dim",
                    "interleave_self_attention": "interleave_self_attention",
                    "norm_eps": "norm_eps",
                },
            ),
        ),
        vl_adapter=replace(
            published.head.vl_adapter,
            **_given(
                vlsa_cfg,
                {"heads": "num_attention_heads", "head_dim": "attention_head_dim", "layers": "num_layers"},
            ),
        ),
    )
    if not head.use_vlln:  # N1.5 builds the VL adapter only with the vlln (N1.7: when it has layers)
        head = replace(head, vl_adapter=replace(head.vl_adapter, layers=0))
    cfg = GrootConfig(backbone=backbone, head=head)
    _check_config(cfg, dit_cfg)
    return cfg


def _given(section: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """our field -> the section's value, for the fields the section sets (not null)."""
    return {ours: section[theirs] for ours, theirs in names.items() if section.get(theirs) is not None}


def _eagle_config(backbone: EagleConfig, eagle: Mapping[str, Any]) -> EagleConfig:
    """The Eagle config keys (upstream's eagle2_hg_model/config.json) over `backbone`."""
    text, vision = dict(eagle.get("text_config") or {}), dict(eagle.get("vision_config") or {})
    tower, llm = backbone.vision, backbone.llm
    heads = text.get("num_attention_heads", llm.num_heads)
    return replace(
        backbone,
        vision=replace(
            tower,
            width=vision.get("hidden_size", tower.width),
            depth=vision.get("num_hidden_layers", tower.depth),
            num_heads=vision.get("num_attention_heads", tower.num_heads),
            mlp_dim=vision.get("intermediate_size", tower.mlp_dim),
            norm_eps=vision.get("layer_norm_eps", tower.norm_eps),
            patch_size=vision.get("patch_size", tower.patch_size),
            image_size=eagle.get("force_image_size") or vision.get("image_size", tower.image_size),
        ),
        llm=replace(
            llm,
            width=text.get("hidden_size", llm.width),
            depth=text.get("num_hidden_layers", llm.depth),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=text.get("head_dim") or text.get("hidden_size", llm.width) // heads,
            mlp_dim=text.get("intermediate_size", llm.mlp_dim),
            rope_theta=float(text.get("rope_theta", llm.rope_theta)),
            norm_eps=text.get("rms_norm_eps", llm.norm_eps),
        ),
        use_pixel_shuffle=eagle.get("use_pixel_shuffle", backbone.use_pixel_shuffle),
        downsample_ratio=eagle.get("downsample_ratio", backbone.downsample_ratio),
        mlp_connector_layers=eagle.get("mlp_connector_layers", backbone.mlp_connector_layers),
        image_token_id=eagle.get("image_token_index", backbone.image_token_id),
        vocab_size=text.get("vocab_size", backbone.vocab_size),
    )


def head_problems(head: ActionHeadConfig, dit: Mapping[str, Any], version: str) -> list[str]:
    """What the action head cannot be (N1.5 and N1.7 alike): a DiT with positional embeddings or
    another norm, widths that do not chain (VL adapter, DiT, its output)."""
    problems = []
    if dit.get("positional_embeddings") not in (None, ""):
        problems.append(
            f"diffusion_model_cfg.positional_embeddings={dit['positional_embeddings']!r} "
            f"({version} uses null)"
        )
    if dit.get("norm_type", "ada_norm") != "ada_norm":
        problems.append(f"diffusion_model_cfg.norm_type={dit['norm_type']!r} ({version} uses ada_norm)")
    if head.vl_adapter.layers and head.vl_adapter.inner_dim != head.backbone_embedding_dim:
        problems.append(
            f"VL adapter width {head.vl_adapter.inner_dim} != backbone_embedding_dim "
            f"{head.backbone_embedding_dim}"
        )
    if head.dit.inner_dim != head.input_embedding_dim:
        problems.append(f"DiT width {head.dit.inner_dim} != input_embedding_dim {head.input_embedding_dim}")
    if head.dit.output_dim != head.hidden_size:
        problems.append(f"DiT output_dim {head.dit.output_dim} != hidden_size {head.hidden_size}")
    return problems


def _check_config(cfg: GrootConfig, dit: Mapping[str, Any]) -> None:
    backbone, head = cfg.backbone, cfg.head
    problems = head_problems(head, dit, "N1.5")
    if not 1 <= backbone.select_layer <= backbone.llm.depth:
        problems.append(f"backbone_cfg.select_layer={backbone.select_layer} outside 1..{backbone.llm.depth}")
    if backbone.width != head.backbone_embedding_dim:
        problems.append(
            f"backbone width {backbone.width} != action_head_cfg.backbone_embedding_dim "
            f"{head.backbone_embedding_dim}"
        )
    if problems:
        raise ModelLoadError("unsupported GR00T config: " + "; ".join(problems))


def says_lerobot(path: Path) -> bool:
    """Whether config.json marks the checkpoint as LeRobot's ("type": "groot", as LeRobot writes
    its policy configs); such a checkpoint uses LeRobot's embodiment ids (embodiments.py)."""
    raw = read_json(path / "config.json")
    return isinstance(raw, dict) and raw.get("type") == "groot"


def read_config(path: Path) -> GrootConfig:
    raw = read_json(path / "config.json")
    eagle_file = path / "eagle_config.json"
    eagle = read_json(eagle_file) if eagle_file.is_file() else None
    return config_from_json(raw, eagle)


# ----------------------------------------------------------------------------------------------
# weights


_BLOCK = {"attn.to_out": "attn1.to_out.0", "ff.proj_in": "ff.net.0.proj", "ff.proj_out": "ff.net.2"}


def _block_name(rest: str) -> str:
    """A DiT / VL-adapter block's module names -> diffusers' (attn1, to_out.0, ff.net.0.proj, ff.net.2)."""
    module, leaf = rest.rsplit(".", 1)
    if module in _BLOCK:
        return f"{_BLOCK[module]}.{leaf}"
    return rest.replace("attn.", "attn1.", 1)


def head_name(rest: str) -> str:
    """action_head.<rest> (ours) -> upstream's name below "action_head." (N1.5 and N1.7 alike)."""
    if rest.startswith("dit.blocks."):
        _, _, index, inner = rest.split(".", 3)
        return f"model.transformer_blocks.{index}.{_block_name(inner)}"
    if rest.startswith("dit.timestep_embedder."):
        return "model.timestep_encoder." + rest.removeprefix("dit.")
    if rest.startswith("dit."):
        return "model." + rest.removeprefix("dit.")
    if rest.startswith("vl_adapter."):
        _, index, inner = rest.split(".", 2)
        return f"vl_self_attention.transformer_blocks.{index}.{_block_name(inner)}"
    if rest in ("future_tokens", "position_embedding"):
        return rest + ".weight"
    return rest


def groot_names(cfg: GrootConfig) -> NameMap:
    """Our names -> the N1.5 checkpoint's (what upstream's module tree is called)."""

    def sources(name: str, shape: tuple[int, ...]) -> list[Source]:
        head, _, rest = name.partition(".")
        if head == "action_head":
            return [Source("action_head." + head_name(rest))]
        part, _, rest = rest.partition(".")  # backbone.<part>.<rest>
        if part == "vision":
            return [s.under(_VISION) for s in vit.hf_siglip_names(rest, shape)]
        if part == "llm":
            return [Source(_LM + "model." + rest)]
        if part == "eagle_linear":
            return [Source("backbone.eagle_linear." + rest)]
        return [Source(_EAGLE + part + "." + rest)]  # mlp1

    def unused(key: str) -> bool:
        if key.startswith(_VISION) and vit.hf_siglip_unused(key.removeprefix(_VISION)):
            return True  # SigLIP pooling head
        if key.startswith(_LM + "lm_head."):
            return True  # tied, LM logits unused
        prefix = _LM + "model.layers."
        index = key.removeprefix(prefix).split(".", 1)[0]
        return key.startswith(prefix) and index.isdigit() and int(index) >= cfg.backbone.select_layer

    return NameMap(sources, unused)


def load_network(
    build: Callable[[], N],
    path: Path,
    names: NameMap,
    dtype: torch.dtype,
    device: str | torch.device,
    what: str,
) -> N:
    """Build a GR00T network (N1.5 or N1.7) on `meta` and stream the checkpoint into it
    (common/weights.py)."""
    with torch.device("meta"):
        model = build()
    loaded = load_weights(
        model, find_weight_files(path), names, device=device, dtype=dtype, where=str(path), what=what
    )
    assert isinstance(loaded, type(model))
    return loaded


def load_model(path: Path, cfg: GrootConfig, dtype: torch.dtype, device: str | torch.device) -> GR00TN15:
    return load_network(lambda: GR00TN15(cfg), path, groot_names(cfg), dtype, device, "GR00T N1.5")


# ----------------------------------------------------------------------------------------------
# tokenizer


def find_tokenizer(path: Path | None, tokenizer_path: str) -> Path:
    return find_file(path, tokenizer_path, TOKENIZER_FILE, TOKENIZER_HELP)


def load_tokenizer(file: Path, cfg: GrootConfig) -> Any:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise ModelLoadError(f"cannot read tokenizer {file}: {exc}") from None
    lacking = [t for t in REQUIRED_TOKENS if tokenizer.token_to_id(t) is None]
    if lacking:
        raise ModelLoadError(
            f"tokenizer {file} lacks the Eagle tokens {', '.join(lacking)}. {TOKENIZER_HELP}"
        )
    image_id = tokenizer.token_to_id(IMAGE_CONTEXT_TOKEN)
    if image_id != cfg.backbone.image_token_id:
        raise ModelLoadError(
            f"tokenizer {file} maps {IMAGE_CONTEXT_TOKEN} to {image_id}, "
            f"the model expects {cfg.backbone.image_token_id}"
        )
    if tokenizer.get_vocab_size() > cfg.backbone.vocab_size:
        raise ModelLoadError(
            f"tokenizer {file} has {tokenizer.get_vocab_size()} tokens, the model {cfg.backbone.vocab_size}"
        )
    return tokenizer
