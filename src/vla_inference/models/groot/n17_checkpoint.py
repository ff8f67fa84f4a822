"""Everything about the GR00T N1.7 checkpoint format: config, weights, processor files, backbone files.

A checkpoint directory (as NVIDIA publishes nvidia/GR00T-N1.7-3B and its LIBERO / DROID /
SimplerEnv fine-tunes, and as Isaac-GR00T's trainer saves them):

    config.json                 model_type "Gr00tN1d7": select_layer, the head's sizes, diffusion_model_cfg,
                                vl_self_attention_cfg, model_name (the backbone: nvidia/Cosmos-Reason2-2B)
    model.safetensors | model-0000k-of-0000n.safetensors + model.safetensors.index.json
    processor_config.json       {"processor_class": "Gr00tN1d7Processor", "processor_kwargs": {...,
                                "modality_configs": {tag: {video|state|action|language:
                                {"delta_indices": [...], "modality_keys": [...], ...}}}}}
    statistics.json             {tag: {state|action|relative_action: {key: {min, max, mean, std, q01, q99}}}}
    embodiment_id.json          {tag: projector index}

The backbone's tokenizer and image-processor files (Cosmos-Reason2-2B's, gated on the Hub; upstream
downloads them by model_name) must be on disk: in the checkpoint directory or VLA_TOKENIZER_PATH.
The backbone's sizes are the published Cosmos-Reason2-2B ones, unless the directory has a
backbone_config.json (a Qwen3-VL config.json: text_config, vision_config, image_token_id...), or
the backbone files' own config.json is a Qwen3-VL one (VLA_TOKENIZER_PATH pointing at a full copy
of the backbone). The version is config.json's model_type, never the path.

Only JSON and safetensors are read; nothing is unpickled or executed. Statistics and modality
configs are returned as plain data: the policy builds its normalisers from them (one shared
Normalizer interface, phase B).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common.transformer import DecoderConfig
from vla_inference.models.common.weights import NameMap, Source, read_json
from vla_inference.models.groot.action_head import ActionHeadConfig, DiTConfig, VLAdapterConfig
from vla_inference.models.groot.checkpoint import head_name, head_problems, load_network
from vla_inference.models.groot.cosmos import COSMOS_REASON2_2B, CosmosConfig, CosmosVisionConfig
from vla_inference.models.groot.n17 import SIZES, Groot17, Groot17Config

MODEL_TYPE = "Gr00tN1d7"
PUBLISHED_BACKBONE = "nvidia/Cosmos-Reason2-2B"
BACKBONE_CONFIG = "backbone_config.json"
PROCESSOR_CONFIG = "processor_config.json"
STATISTICS = "statistics.json"
EMBODIMENT_IDS = "embodiment_id.json"

# NVIDIA's layout: Gr00tN1d7.backbone (Qwen3Backbone).model (Qwen3VLForConditionalGeneration).model
# (Qwen3VLModel).{visual, language_model}; action_head.{model (the DiT), vl_self_attention, ...}.
# LeRobot (>= 0.6) saves the same names below "_groot_model." (its policy wraps GR00TN17).
_QWEN = "backbone.model."
_VISUAL = _QWEN + "model.visual."
_LM = _QWEN + "model.language_model."
LEROBOT_PREFIX = "_groot_model."

# The backbone files the processor reads (Qwen3VLProcessor: tokenizer, chat template, image processor).
TOKENIZER_FILE = "tokenizer.json"
BACKBONE_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
BACKBONE_HELP = (
    "GR00T N1.7 needs its backbone's tokenizer and image processor files "
    "(nvidia/Cosmos-Reason2-2B: tokenizer.json, tokenizer_config.json, chat_template.jinja or "
    "chat_template.json, preprocessor_config.json; gated on the Hugging Face Hub: accept the "
    "license there and download them once) in the checkpoint directory or in VLA_TOKENIZER_PATH"
)


# ----------------------------------------------------------------------------------------------
# config


def backbone_from_json(raw: Mapping[str, Any], select_layer: int) -> CosmosConfig:
    """A Qwen3-VL config.json (text_config, vision_config, token ids) -> CosmosConfig."""
    text, vision = dict(raw.get("text_config") or {}), dict(raw.get("vision_config") or {})
    base, v0 = COSMOS_REASON2_2B, COSMOS_REASON2_2B.vision
    rope = dict(text.get("rope_scaling") or text.get("rope_parameters") or {})
    if rope and rope.get("mrope_interleaved") is False:
        raise ModelLoadError("unsupported backbone: M-RoPE sections not interleaved (Qwen2.5-VL style)")
    heads = int(text.get("num_attention_heads", base.text.num_heads))
    width = int(text.get("hidden_size", base.text.width))
    return CosmosConfig(
        vision=CosmosVisionConfig(
            width=int(vision.get("hidden_size", v0.width)),
            depth=int(vision.get("depth", v0.depth)),
            num_heads=int(vision.get("num_heads", v0.num_heads)),
            mlp_dim=int(vision.get("intermediate_size", v0.mlp_dim)),
            patch_size=int(vision.get("patch_size", v0.patch_size)),
            temporal_patch_size=int(vision.get("temporal_patch_size", v0.temporal_patch_size)),
            merge=int(vision.get("spatial_merge_size", v0.merge)),
            num_position_embeddings=int(vision.get("num_position_embeddings", v0.num_position_embeddings)),
            out_width=int(vision.get("out_hidden_size", v0.out_width)),
            deepstack=tuple(int(i) for i in vision.get("deepstack_visual_indexes", v0.deepstack)),
        ),
        text=DecoderConfig(
            width=width,
            depth=int(text.get("num_hidden_layers", base.text.depth)),
            mlp_dim=int(text.get("intermediate_size", base.text.mlp_dim)),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads", heads)),
            head_dim=int(text.get("head_dim") or width // heads),
            rope_theta=float(text.get("rope_theta") or rope.get("rope_theta") or base.text.rope_theta),
            norm_eps=float(text.get("rms_norm_eps", base.text.norm_eps)),
            qk_norm=True,
        ),
        vocab_size=int(text.get("vocab_size", base.vocab_size)),
        select_layer=select_layer,
        mrope_section=tuple(rope.get("mrope_section", base.mrope_section)),  # type: ignore[arg-type]
        image_token_id=int(raw.get("image_token_id", base.image_token_id)),
        video_token_id=int(raw.get("video_token_id", base.video_token_id)),
        vision_start_id=int(raw.get("vision_start_token_id", base.vision_start_id)),
        vision_end_id=int(raw.get("vision_end_token_id", base.vision_end_id)),
    )


def config_from_json(raw: Mapping[str, Any], backbone: Mapping[str, Any] | None = None) -> Groot17Config:
    """config.json (+ the backbone's Qwen3-VL config, else the published Cosmos-Reason2-2B one) ->
    Groot17Config. Every size is read from the file; the defaults only fill what it leaves out."""
    if raw.get("model_type") != MODEL_TYPE:
        raise ModelLoadError(
            f"config.json has model_type {raw.get('model_type')!r}; "
            f"GR00T N1.7 checkpoints have {MODEL_TYPE!r}"
        )
    published = SIZES["n1.7-3b"]
    h0 = published.head
    select_layer = int(raw.get("select_layer", COSMOS_REASON2_2B.select_layer))
    if backbone is None:
        name = str(raw.get("model_name", PUBLISHED_BACKBONE))
        if name.rstrip("/") != PUBLISHED_BACKBONE:
            raise ModelLoadError(
                f"config.json names the backbone {name!r}, whose sizes are unknown here: put its "
                f"config.json in the checkpoint directory as {BACKBONE_CONFIG}"
            )
        cosmos = replace(COSMOS_REASON2_2B, select_layer=select_layer)
    else:
        cosmos = backbone_from_json(backbone, select_layer)
    dit = dict(raw.get("diffusion_model_cfg") or {})
    vlsa = raw.get("vl_self_attention_cfg")
    adapter = VLAdapterConfig(layers=0)  # no vl_self_attention_cfg (or 0 layers): no adapter
    if isinstance(vlsa, Mapping) and int(vlsa.get("num_layers", 0)) > 0:
        adapter = VLAdapterConfig(
            heads=int(vlsa.get("num_attention_heads", h0.vl_adapter.heads)),
            head_dim=int(vlsa.get("attention_head_dim", h0.vl_adapter.head_dim)),
            layers=int(vlsa["num_layers"]),
        )
    backbone_width = int(raw.get("backbone_embedding_dim", h0.backbone_embedding_dim))
    head = ActionHeadConfig(
        backbone_embedding_dim=backbone_width,
        input_embedding_dim=int(raw.get("input_embedding_dim", h0.input_embedding_dim)),
        hidden_size=int(raw.get("hidden_size", h0.hidden_size)),
        max_state_dim=int(raw.get("max_state_dim", h0.max_state_dim)),
        action_dim=int(raw.get("max_action_dim", h0.action_dim)),
        action_horizon=int(raw.get("action_horizon", h0.action_horizon)),
        num_target_vision_tokens=0,
        max_seq_len=int(raw.get("max_seq_len", h0.max_seq_len)),
        max_num_embodiments=int(raw.get("max_num_embodiments", h0.max_num_embodiments)),
        num_timestep_buckets=int(raw.get("num_timestep_buckets", h0.num_timestep_buckets)),
        num_inference_timesteps=int(raw.get("num_inference_timesteps", h0.num_inference_timesteps)),
        add_pos_embed=bool(raw.get("add_pos_embed", h0.add_pos_embed)),
        use_vlln=bool(raw.get("use_vlln", h0.use_vlln)),
        state_history=int(raw.get("state_history_length", h0.state_history)),
        dit=DiTConfig(
            heads=int(dit.get("num_attention_heads", h0.dit.heads)),
            head_dim=int(dit.get("attention_head_dim", h0.dit.head_dim)),
            layers=int(dit.get("num_layers", h0.dit.layers)),
            output_dim=int(dit.get("output_dim", h0.dit.output_dim)),
            cross_attention_dim=backbone_width,  # upstream passes backbone_embedding_dim
            norm_eps=float(dit.get("norm_eps", h0.dit.norm_eps)),
            attend_text_every_n_blocks=int(
                raw.get("attend_text_every_n_blocks", h0.dit.attend_text_every_n_blocks)
            ),
        ),
        vl_adapter=adapter,
    )
    target = raw.get("image_target_size") or [published.image_size]
    cfg = Groot17Config(backbone=cosmos, head=head, image_size=int(target[0]))
    _check_config(cfg, raw, dit)
    return cfg


def _check_config(cfg: Groot17Config, raw: Mapping[str, Any], dit: Mapping[str, Any]) -> None:
    head, bb = cfg.head, cfg.backbone
    problems = head_problems(head, dit, "N1.7")
    if raw.get("use_alternate_vl_dit", True) is not True:
        problems.append(
            "use_alternate_vl_dit=false (the plain DiT; the published N1.7 checkpoints alternate)"
        )
    if dit.get("interleave_self_attention", True) is not True:
        problems.append("diffusion_model_cfg.interleave_self_attention=false (AlternateVLDiT requires it)")
    if not len(bb.vision.deepstack) < bb.select_layer <= bb.text.depth:
        problems.append(
            f"select_layer={bb.select_layer} outside {len(bb.vision.deepstack) + 1}..{bb.text.depth}"
        )
    if bb.vision.out_width != bb.text.width or bb.text.width != head.backbone_embedding_dim:
        problems.append(
            f"backbone width {bb.text.width} (vision out {bb.vision.out_width}) != "
            f"backbone_embedding_dim {head.backbone_embedding_dim}"
        )
    if head.dit.attend_text_every_n_blocks < 1:
        problems.append(f"attend_text_every_n_blocks={head.dit.attend_text_every_n_blocks} (must be >= 1)")
    if sum(bb.mrope_section) != bb.text.head_dim // 2:
        problems.append(f"mrope_section {list(bb.mrope_section)} does not cover head_dim / 2")
    if cfg.image_size % (bb.vision.patch_size * bb.vision.merge):
        problems.append(f"image size {cfg.image_size} not a multiple of patch x merge")
    if problems:
        raise ModelLoadError("unsupported GR00T N1.7 config: " + "; ".join(problems))


def model_type(path: Path) -> str | None:
    """config.json's model_type (how a loader tells N1.5 from N1.7: never from the path)."""
    value = read_json(path / "config.json").get("model_type")
    return value if isinstance(value, str) else None


def read_config(path: Path, backbone_dir: Path | None = None) -> Groot17Config:
    raw = read_json(path / "config.json")
    backbone: dict[str, Any] | None = None
    if (path / BACKBONE_CONFIG).is_file():
        backbone = read_json(path / BACKBONE_CONFIG)
    elif backbone_dir is not None and backbone_dir != path and (backbone_dir / "config.json").is_file():
        candidate = read_json(backbone_dir / "config.json")
        if str(candidate.get("model_type", "")).startswith("qwen3_vl"):
            backbone = candidate
    return config_from_json(raw, backbone)


# ----------------------------------------------------------------------------------------------
# weights


def _vision_name(rest: str, cfg: Groot17Config) -> Source:
    """backbone.visual.<rest> (ours) -> the checkpoint's Source (HF Qwen3VLVisionModel names)."""
    v = cfg.backbone.vision
    if rest.startswith("patch_embed."):
        leaf = rest.split(".")[-1]
        shape = (v.width, 3, v.temporal_patch_size, v.patch_size, v.patch_size) if leaf == "weight" else None
        return Source(_VISUAL + "patch_embed.proj." + leaf, shape=shape)  # a Conv3d there
    if rest == "pos_embed":
        return Source(_VISUAL + "pos_embed.weight")
    if rest.startswith("deepstack_mergers."):
        rest = "deepstack_merger_list." + rest.removeprefix("deepstack_mergers.")
    parts = rest.split(".")
    if len(parts) >= 2 and parts[-2] in ("fc1", "fc2"):  # mlp.fc1 / merger.fc2 -> linear_fc1 / linear_fc2
        parts[-2] = "linear_" + parts[-2]
    return Source(_VISUAL + ".".join(parts))


def n17_names(cfg: Groot17Config, prefix: str = "") -> NameMap:
    """Our names -> NVIDIA's N1.7 checkpoint names (LeRobot's: prefix="_groot_model.")."""

    def sources(name: str, shape: tuple[int, ...]) -> list[Source]:
        part, _, rest = name.partition(".")
        if part == "action_head":
            return [Source(prefix + "action_head." + head_name(rest))]
        sub, _, rest = rest.partition(".")  # backbone.<visual|llm>.<rest>
        if sub == "visual":
            return [_vision_name(rest, cfg).under(prefix)]
        return [Source(prefix + _LM + rest)]

    def unused(key: str) -> bool:
        key = key.removeprefix(prefix)
        if key == _QWEN + "lm_head.weight":
            return True  # tied to embed_tokens; the LM's logits are never computed
        layers = _LM + "layers."
        index = key.removeprefix(layers).split(".", 1)[0]
        return key.startswith(layers) and index.isdigit() and int(index) >= cfg.backbone.select_layer

    return NameMap(sources, unused)


def load_model(path: Path, cfg: Groot17Config, dtype: torch.dtype, device: str) -> Groot17:
    return load_network(lambda: Groot17(cfg), path, n17_names(cfg), dtype, device, "GR00T N1.7")


# ----------------------------------------------------------------------------------------------
# processor files (plain data; phase B builds the normalisers and the prompt from them)


@dataclass(frozen=True)
class ModalityConfig:
    delta_indices: tuple[int, ...]
    modality_keys: tuple[str, ...]
    extra: Mapping[str, Any]  # sin_cos_embedding_keys, mean_std_embedding_keys, action_configs, ...


@dataclass(frozen=True)
class ProcessorFiles:
    """processor_config.json, statistics.json and embodiment_id.json of one checkpoint."""

    kwargs: Mapping[str, Any]  # processor_kwargs as written (image sizes, use_percentiles, ...)
    modalities: Mapping[str, Mapping[str, ModalityConfig]]  # tag -> video|state|action|language
    statistics: Mapping[str, Any]  # tag -> state|action|relative_action -> key -> {min, max, q01, ...}
    embodiment_ids: Mapping[str, int]  # tag -> projector index

    def embodiment_id(self, tag: str, slots: int) -> int:
        if tag not in self.embodiment_ids:
            raise ModelLoadError(f"{EMBODIMENT_IDS} has no projector index for {tag!r}")
        index = self.embodiment_ids[tag]
        if not 0 <= index < slots:
            raise ModelLoadError(
                f"{EMBODIMENT_IDS} maps {tag!r} to {index}, outside the model's {slots} slots"
            )
        return index


def _modality(where: str, raw: Any) -> ModalityConfig:
    if not isinstance(raw, Mapping):
        raise ModelLoadError(f"{where} is not an object")
    try:
        deltas = tuple(int(i) for i in raw.get("delta_indices", []))
        keys = tuple(str(k) for k in raw.get("modality_keys", []))
    except (TypeError, ValueError):
        raise ModelLoadError(f"{where}: delta_indices / modality_keys malformed") from None
    extra = {k: v for k, v in raw.items() if k not in ("delta_indices", "modality_keys")}
    return ModalityConfig(deltas, keys, extra)


def read_processor_files(path: Path) -> ProcessorFiles:
    config = read_json(path / PROCESSOR_CONFIG)
    kwargs = config.get("processor_kwargs")
    if not isinstance(kwargs, Mapping):
        raise ModelLoadError(f"{path / PROCESSOR_CONFIG} has no processor_kwargs object")
    raw_modalities = kwargs.get("modality_configs")
    if not isinstance(raw_modalities, Mapping) or not raw_modalities:
        raise ModelLoadError(f"{path / PROCESSOR_CONFIG} has no processor_kwargs.modality_configs")
    modalities = {
        str(tag): {
            str(kind): _modality(f"{PROCESSOR_CONFIG} modality_configs.{tag}.{kind}", value)
            for kind, value in (entry.items() if isinstance(entry, Mapping) else ())
        }
        for tag, entry in raw_modalities.items()
    }
    statistics = read_json(path / STATISTICS)
    ids_raw = read_json(path / EMBODIMENT_IDS)
    try:
        ids = {str(tag): int(index) for tag, index in ids_raw.items()}
    except (TypeError, ValueError):
        raise ModelLoadError(
            f"{path / EMBODIMENT_IDS} maps a tag to something other than an integer"
        ) from None
    return ProcessorFiles(dict(kwargs), modalities, statistics, ids)


# ----------------------------------------------------------------------------------------------
# the backbone's tokenizer / image processor files


@dataclass(frozen=True)
class BackboneFiles:
    directory: Path
    tokenizer: Path  # tokenizer.json
    tokenizer_config: Path
    preprocessor_config: Path
    chat_template: str  # the Jinja source the prompt is rendered with


def find_backbone_files(path: Path, tokenizer_path: str) -> BackboneFiles:
    """The backbone files in VLA_TOKENIZER_PATH (a directory, or its tokenizer.json) if set, else in
    the checkpoint directory; ModelLoadError naming what is missing and where it comes from."""
    directory = path
    if tokenizer_path:
        given = Path(tokenizer_path).expanduser()
        directory = given if given.is_dir() else given.parent
    missing = [name for name in BACKBONE_FILES if not (directory / name).is_file()]
    template = _chat_template(directory)
    if template is None:
        missing.append(
            "chat_template.jinja (or chat_template.json, or tokenizer_config.json's chat_template)"
        )
    if missing:
        raise ModelLoadError(f"missing {', '.join(missing)} in {directory}. {BACKBONE_HELP}")
    assert template is not None
    return BackboneFiles(
        directory,
        directory / TOKENIZER_FILE,
        directory / "tokenizer_config.json",
        directory / "preprocessor_config.json",
        template,
    )


def _chat_template(directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            value = read_json(directory / name).get("chat_template")
            if isinstance(value, str) and value:
                return value
    return None
