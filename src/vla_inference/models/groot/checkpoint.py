"""Everything about the GR00T N1.5 checkpoint format: config, weights, metadata, tokenizer.

A checkpoint directory (as NVIDIA publishes nvidia/GR00T-N1.5-3B and as fine-tunes save it):

    config.json                      model_type "gr00t_n1_5", backbone_cfg, action_head_cfg
    model.safetensors | model-0000k-of-0000n.safetensors + model.safetensors.index.json
    experiment_cfg/metadata.json     per embodiment tag: statistics + modalities
    tokenizer.json                   Qwen3 tokenizer with the Eagle tokens (see TOKENIZER_HELP)

Only safetensors and JSON are read; nothing is unpickled or executed.

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

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vla_inference.models.base import ModelLoadError
from vla_inference.models.groot.model import GR00TN15, SIZES, GrootConfig

MODEL_TYPE = "gr00t_n1_5"

# Checkpoint tensors that exist upstream but are not used for actions.
_UNUSED_PREFIXES = (
    "backbone.eagle_model.vision_model.vision_model.head.",  # SigLIP pooling head
    "backbone.eagle_model.language_model.lm_head.",  # tied, LM logits unused
)

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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"missing {path}") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def config_from_json(raw: Mapping[str, Any], eagle: Mapping[str, Any] | None = None) -> GrootConfig:
    """config.json (+ optional Eagle config) -> GrootConfig."""
    if raw.get("model_type") != MODEL_TYPE:
        raise ModelLoadError(
            f"config.json has model_type {raw.get('model_type')!r}; "
            f"this backend serves GR00T N1.5 ({MODEL_TYPE!r})"
        )
    backbone = dict(raw.get("backbone_cfg") or {})
    head = dict(raw.get("action_head_cfg") or {})
    dit = dict(head.get("diffusion_model_cfg") or {})
    vlsa = dict(head.get("vl_self_attention_cfg") or {})
    eagle = eagle if eagle is not None else backbone.get("eagle_config")
    cfg = SIZES["n1.5-3b"]
    values: dict[str, Any] = {}
    if eagle:
        text, vision = dict(eagle.get("text_config") or {}), dict(eagle.get("vision_config") or {})
        image_size = eagle.get("force_image_size") or vision.get("image_size", cfg.image_size)
        heads = text.get("num_attention_heads", cfg.llm_heads)
        values.update(
            vit_hidden=vision.get("hidden_size", cfg.vit_hidden),
            vit_layers=vision.get("num_hidden_layers", cfg.vit_layers),
            vit_heads=vision.get("num_attention_heads", cfg.vit_heads),
            vit_intermediate=vision.get("intermediate_size", cfg.vit_intermediate),
            vit_eps=vision.get("layer_norm_eps", cfg.vit_eps),
            patch_size=vision.get("patch_size", cfg.patch_size),
            image_size=image_size,
            use_pixel_shuffle=eagle.get("use_pixel_shuffle", cfg.use_pixel_shuffle),
            downsample_ratio=eagle.get("downsample_ratio", cfg.downsample_ratio),
            mlp_connector_layers=eagle.get("mlp_connector_layers", cfg.mlp_connector_layers),
            image_token_id=eagle.get("image_token_index", cfg.image_token_id),
            vocab_size=text.get("vocab_size", cfg.vocab_size),
            llm_hidden=text.get("hidden_size", cfg.llm_hidden),
            llm_layers=text.get("num_hidden_layers", cfg.llm_layers),
            llm_heads=heads,
            llm_kv_heads=text.get("num_key_value_heads", heads),
            llm_head_dim=text.get("head_dim") or text.get("hidden_size", cfg.llm_hidden) // heads,
            llm_intermediate=text.get("intermediate_size", cfg.llm_intermediate),
            rope_theta=float(text.get("rope_theta", cfg.rope_theta)),
            rms_eps=text.get("rms_norm_eps", cfg.rms_eps),
        )
    select_layer = backbone.get("select_layer", cfg.select_layer)
    values["select_layer"] = select_layer
    values["project_to_dim"] = backbone.get("project_to_dim")
    for ours, theirs, src in (
        ("backbone_embedding_dim", "backbone_embedding_dim", head),
        ("input_embedding_dim", "input_embedding_dim", head),
        ("hidden_size", "hidden_size", head),
        ("max_state_dim", "max_state_dim", head),
        ("action_dim", "action_dim", head),
        ("action_horizon", "action_horizon", head),
        ("num_target_vision_tokens", "num_target_vision_tokens", head),
        ("max_seq_len", "max_seq_len", head),
        ("max_num_embodiments", "max_num_embodiments", head),
        ("num_timestep_buckets", "num_timestep_buckets", head),
        ("num_inference_timesteps", "num_inference_timesteps", head),
        ("add_pos_embed", "add_pos_embed", head),
        ("use_vlln", "use_vlln", head),
        ("dit_heads", "num_attention_heads", dit),
        ("dit_head_dim", "attention_head_dim", dit),
        ("dit_layers", "num_layers", dit),
        ("dit_output_dim", "output_dim", dit),
        ("cross_attention_dim", "cross_attention_dim", dit),
        ("interleave_self_attention", "interleave_self_attention", dit),
        ("dit_norm_eps", "norm_eps", dit),
        ("vlsa_heads", "num_attention_heads", vlsa),
        ("vlsa_head_dim", "attention_head_dim", vlsa),
        ("vlsa_layers", "num_layers", vlsa),
    ):
        if src.get(theirs) is not None:
            values[ours] = src[theirs]
    cfg = replace(cfg, **values)
    _check_config(cfg, dit)
    return cfg


def _check_config(cfg: GrootConfig, dit: Mapping[str, Any]) -> None:
    problems = []
    if dit.get("positional_embeddings") not in (None, ""):
        problems.append(
            f"diffusion_model_cfg.positional_embeddings={dit['positional_embeddings']!r} (N1.5 uses null)"
        )
    if dit.get("norm_type", "ada_norm") != "ada_norm":
        problems.append(f"diffusion_model_cfg.norm_type={dit['norm_type']!r} (N1.5 uses ada_norm)")
    if not 1 <= cfg.select_layer <= cfg.llm_layers:
        problems.append(f"backbone_cfg.select_layer={cfg.select_layer} outside 1..{cfg.llm_layers}")
    width = cfg.project_to_dim or cfg.llm_hidden
    if width != cfg.backbone_embedding_dim:
        problems.append(
            f"backbone width {width} != action_head_cfg.backbone_embedding_dim {cfg.backbone_embedding_dim}"
        )
    if cfg.use_vlln and cfg.vlsa_inner_dim != cfg.backbone_embedding_dim:
        problems.append(
            f"VL adapter width {cfg.vlsa_inner_dim} != backbone_embedding_dim {cfg.backbone_embedding_dim}"
        )
    if cfg.dit_inner_dim != cfg.input_embedding_dim:
        problems.append(f"DiT width {cfg.dit_inner_dim} != input_embedding_dim {cfg.input_embedding_dim}")
    if problems:
        raise ModelLoadError("unsupported GR00T config: " + "; ".join(problems))


def says_lerobot(path: Path) -> bool:
    """Whether config.json marks the checkpoint as LeRobot's ("type": "groot", as LeRobot writes
    its policy configs); such a checkpoint uses LeRobot's embodiment ids (embodiments.py)."""
    raw = _read_json(path / "config.json")
    return isinstance(raw, dict) and raw.get("type") == "groot"


def read_config(path: Path) -> GrootConfig:
    raw = _read_json(path / "config.json")
    eagle_file = path / "eagle_config.json"
    eagle = _read_json(eagle_file) if eagle_file.is_file() else None
    return config_from_json(raw, eagle)


# ----------------------------------------------------------------------------------------------
# weights


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shards that are not in {path}: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no safetensors weights in {path} (expected model.safetensors or an index + shards)"
        )
    return files


def is_unused_key(name: str, cfg: GrootConfig) -> bool:
    if name.startswith(_UNUSED_PREFIXES):
        return True
    prefix = "backbone.eagle_model.language_model.model.layers."
    if name.startswith(prefix):
        index = name[len(prefix) :].split(".", 1)[0]
        return index.isdigit() and int(index) >= cfg.select_layer  # layers above select_layer
    return False


def load_weights(model: GR00TN15, path: Path, dtype: torch.dtype, device: str) -> None:
    """Fill `model` (built on the meta device) from the checkpoint; names match one to one.

    Refuses missing, unexpected and mis-shaped tensors, listing them. Tensors upstream keeps but
    never uses for actions (SigLIP pooling head, lm_head, LM layers above select_layer) are skipped.
    """
    from safetensors import safe_open

    own = {name: tuple(p.shape) for name, p in model.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    wrong_shape: list[str] = []
    for file in _weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                    if name not in own:
                        if not is_unused_key(name, model.cfg):
                            unexpected.append(name)
                        continue
                    tensor = handle.get_tensor(name)
                    if tuple(tensor.shape) != own[name]:
                        wrong_shape.append(f"{name} {tuple(tensor.shape)} != {own[name]}")
                        continue
                    state[name] = tensor.to(device=device, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot read {file}: {exc}") from None
    missing = sorted(set(own) - set(state))
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing weights ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"unexpected weights ({len(unexpected)}): {', '.join(sorted(unexpected)[:20])}")
        if wrong_shape:
            parts.append(f"wrong shapes ({len(wrong_shape)}): {', '.join(wrong_shape[:20])}")
        raise ModelLoadError(f"checkpoint {path} does not match GR00T N1.5: " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=True)


# ----------------------------------------------------------------------------------------------
# tokenizer


def find_tokenizer(path: Path | None, tokenizer_path: str) -> Path:
    candidates: list[Path] = []
    if tokenizer_path:
        given = Path(tokenizer_path)
        candidates.append(given / TOKENIZER_FILE if given.is_dir() else given)
    if path is not None:
        candidates.append(path / TOKENIZER_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates) or "nowhere"
    raise ModelLoadError(f"missing {TOKENIZER_FILE} (looked in {looked}). {TOKENIZER_HELP}")


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
    if image_id != cfg.image_token_id:
        raise ModelLoadError(
            f"tokenizer {file} maps {IMAGE_CONTEXT_TOKEN} to {image_id}, "
            f"the model expects {cfg.image_token_id}"
        )
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ModelLoadError(
            f"tokenizer {file} has {tokenizer.get_vocab_size()} tokens, the model {cfg.vocab_size}"
        )
    return tokenizer


def parameter_count(cfg: GrootConfig) -> int:
    with torch.device("meta"):
        model = GR00TN15(cfg)
    return sum(p.numel() for p in model.parameters())
