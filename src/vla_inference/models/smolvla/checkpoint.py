"""LeRobot's SmolVLA checkpoints (huggingface/lerobot, policies/smolvla; Hub lerobot/smolvla_base and
its fine-tunes), read offline from one directory:

    <dir>/config.json           {"type": "smolvla", input_features, output_features, chunk_size,
                                 max_state_dim, max_action_dim, resize_imgs_with_padding,
                                 empty_cameras, tokenizer_max_length, pad_language_to, num_steps,
                                 vlm_model_name, num_vlm_layers, num_expert_layers, attention_mode,
                                 self_attn_every_n_layers, expert_width_multiplier, ...}
    <dir>/model.safetensors     "model.vlm_with_expert.vlm.model.{vision_model,connector,text_model}...",
                                "model.vlm_with_expert.vlm.lm_head.weight" (never used),
                                "model.vlm_with_expert.lm_expert.{layers,norm}...",
                                "model.{state_proj,action_in_proj,action_out_proj,action_time_mlp_in,
                                action_time_mlp_out}.{weight,bias}"; a torch.compile'd module saves
                                "_orig_mod." into the names (tolerated); checkpoints from before
                                LeRobot's processor pipelines also hold "normalize_inputs.buffer_*",
                                "normalize_targets.buffer_*", "unnormalize_outputs.buffer_*"
    <dir>/policy_preprocessor.json + policy_preprocessor_step_<i>_normalizer_processor.safetensors
    <dir>/policy_postprocessor.json + policy_postprocessor_step_<i>_unnormalizer_processor.safetensors
                                read by models/common/lerobot.py (steps found by registry name;
                                "<feature>.<stat>" tensors or, in the migrated multi-dataset base
                                checkpoint, "<dataset>.buffer.<feature>.<stat>"; older checkpoints'
                                normalize_* buffers in model.safetensors)

The backbone's sizes come from a SmolVLM config.json (beside the tokenizer, or in the directory
`vlm_model_name` names when it exists here: a path, or that name inside the checkpoint directory)
or, without one, from the named size that `vlm_model_name` stands for (KNOWN_BACKBONES). The
tokenizer is SmolVLM2's tokenizer.json with tokenizer_config.json / special_tokens_map.json beside
it (for the padding token), in the checkpoint directory, in the `vlm_model_name` directory, or at
VLA_TOKENIZER_PATH; nothing is downloaded. Only JSON and safetensors are read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common import lerobot as lr
from vla_inference.models.common import vit
from vla_inference.models.common.tokenizers import find_tokenizer
from vla_inference.models.common.transformer import DecoderConfig
from vla_inference.models.common.vit import ViTConfig
from vla_inference.models.common.weights import (
    NameMap,
    Source,
    find_weight_files,
    load_weights,
    read_json,
    read_layout,
)
from vla_inference.models.smolvla.model import (
    SIZES,
    SmolVLAConfig,
    SmolVLAModel,
    build,
    expert_config,
    smolvlm_text,
)
from vla_inference.preprocessing import normalize as nz

TYPE = "smolvla"
PREFIX = "model."
VLM = PREFIX + "vlm_with_expert.vlm."
VISION = VLM + "model.vision_model."
CONNECTOR = VLM + "model.connector.modality_projection.proj."
TEXT = VLM + "model.text_model."
EXPERT = PREFIX + "vlm_with_expert.lm_expert."
EMBED_KEY = TEXT + "embed_tokens.weight"
LM_HEAD = VLM + "lm_head.weight"  # SmolVLM's LM head: saved, never used by the policy
COMPILED = "_orig_mod."
LEGACY_GROUPS = tuple(f"{group}." for group in (*lr.LEGACY_PRE, *lr.LEGACY_POST))

TOKENIZER_STEP = "tokenizer_processor"
STATE = "observation.state"
ACTION = "action"
FEATURE_TYPES = {STATE: "STATE", ACTION: "ACTION"}  # the features normalised, by config feature type

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_HELP = (
    "SmolVLA uses the tokenizer of its backbone: tokenizer.json, tokenizer_config.json and "
    "special_tokens_map.json from the HuggingFaceTB/SmolVLM2-500M-Video-Instruct repository "
    "(LeRobot checkpoints ship none)."
)


def canonical(key: str) -> str:
    """A checkpoint key without torch.compile's "_orig_mod." parts."""
    return key.replace(COMPILED, "")


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def lerobot_names(layout_keys: Iterable[str] = (), embed_key: str = EMBED_KEY) -> NameMap:
    """Our parameter names -> LeRobot's. `layout_keys`: the file's keys, so that a compiled
    save's "_orig_mod." names are read; `embed_key`: which tensor holds the token embedding (the
    LM head when a tied save kept only that name)."""
    actual = {canonical(key): key for key in layout_keys}

    def sources(name: str, shape: tuple[int, ...]) -> list[Source]:
        head, _, rest = name.partition(".")
        if head == "vision":
            found = [s.under(VISION) for s in vit.hf_siglip_names(rest, shape)]
        elif head == "connector":
            found = [Source(CONNECTOR + rest.removeprefix("proj."))]
        elif name == "vlm.embed_tokens.weight":
            found = [Source(embed_key)]
        elif head == "vlm":
            found = [Source(TEXT + rest)]
        elif head == "expert":
            found = [Source(EXPERT + rest)]
        else:  # the heads keep their names under "model."
            found = [Source(PREFIX + name)]
        return [replace(s, key=actual.get(s.key, s.key)) for s in found]

    def unused(key: str) -> bool:
        key = canonical(key)
        return (key == LM_HEAD and embed_key != LM_HEAD) or key.startswith(LEGACY_GROUPS)

    return NameMap(sources, unused)


# --------------------------------------------------------------------------------------------
# config.json -> SmolVLAConfig
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """The SmolVLM sizes SmolVLA builds on (the whole text model, before truncation)."""

    vision: ViTConfig
    text: DecoderConfig
    vocab_size: int
    scale_factor: int
    source: str  # where the sizes came from


def _int(config: Mapping[str, Any], key: str, where: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ModelLoadError(f"{where}: {key}={value!r} must be an integer")
    return value


# transformers' defaults of SmolVLMConfig()'s sub-configs (its vision config; the Llama text config
# it makes). save_pretrained writes a config.json as the difference from these (a nested key equal
# to its default is left out), so a missing key means this value.
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "patch_size": 32,
    "image_size": 224,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}
TEXT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "rms_norm_eps": 1e-5,
    "vocab_size": 32000,
    "hidden_act": "silu",
}
SCALE_FACTOR_DEFAULT = 2


def read_backbone(path: Path) -> Backbone:
    """A SmolVLM config.json (model_type smolvlm / idefics3) -> its sizes; keys it leaves out take
    transformers' defaults (VISION_DEFAULTS, TEXT_DEFAULTS), as transformers reads it."""
    config = read_json(path)
    if config.get("model_type") not in ("smolvlm", "idefics3"):
        raise ModelLoadError(f"{path}: model_type={config.get('model_type')!r} is not a SmolVLM config")
    text, vision = config.get("text_config"), config.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ModelLoadError(f"{path}: needs text_config and vision_config objects")
    vocab = text.get("vocab_size", config.get("vocab_size", TEXT_DEFAULTS["vocab_size"]))
    vision, text = VISION_DEFAULTS | vision, TEXT_DEFAULTS | text | {"vocab_size": vocab}
    if vision["hidden_act"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelLoadError(f"{path}: vision_config.hidden_act={vision['hidden_act']!r} is not supported")
    if text["hidden_act"] != "silu" or text.get("attention_bias") or text.get("mlp_bias"):
        raise ModelLoadError(f"{path}: only a SiLU text model without biases is supported")
    width, heads = _int(text, "hidden_size", path), _int(text, "num_attention_heads", path)
    head_dim = text.get("head_dim") or width // heads
    return Backbone(
        vision=ViTConfig(
            width=_int(vision, "hidden_size", path),
            depth=_int(vision, "num_hidden_layers", path),
            num_heads=_int(vision, "num_attention_heads", path),
            mlp_dim=_int(vision, "intermediate_size", path),
            patch_size=_int(vision, "patch_size", path),
            image_size=_int(vision, "image_size", path),
            norm_eps=float(vision["layer_norm_eps"]),
        ),
        text=smolvlm_text(
            width,
            _int(text, "num_hidden_layers", path),
            _int(text, "intermediate_size", path),
            heads=heads,
            kv_heads=_int(text, "num_key_value_heads", path, heads),
            head_dim=int(head_dim),
            eps=float(text["rms_norm_eps"]),
        ),
        vocab_size=_int(text, "vocab_size", path),
        scale_factor=_int(config, "scale_factor", path, SCALE_FACTOR_DEFAULT),
        source=str(path),
    )


# Backbones known by their Hub id: (our named size, the text model's full depth).
KNOWN_BACKBONES = {"HuggingFaceTB/SmolVLM2-500M-Video-Instruct": ("smolvla_base", 32)}


def named_backbone(name: str) -> Backbone | None:
    """The backbone `vlm_model_name` (a Hub id) stands for, from our named sizes; else None."""
    if name not in KNOWN_BACKBONES:
        return None
    size, depth = KNOWN_BACKBONES[name]
    cfg = SIZES[size]
    return Backbone(
        cfg.vision, replace(cfg.vlm, depth=depth), cfg.vocab_size, cfg.scale_factor, f"SIZES[{size!r}]"
    )


def smolvla_config(config: Mapping[str, Any], backbone: Backbone, where: Path) -> SmolVLAConfig:
    """LeRobot's config.json fields + the backbone -> SmolVLAConfig; unsupported options refused."""
    if config.get("attention_mode", "cross_attn") != "cross_attn":
        raise ModelLoadError(f"{where}: attention_mode={config.get('attention_mode')!r}: only cross_attn")
    for flag in ("add_image_special_tokens", "adapt_to_pi_aloha", "use_delta_joint_actions_aloha"):
        if config.get(flag):
            raise ModelLoadError(f"{where}: {flag}=true is not supported by this server")
    text = backbone.text
    kept = _int(config, "num_vlm_layers", where, 16)
    if kept > text.depth:
        raise ModelLoadError(
            f"{where}: num_vlm_layers={kept} but {backbone.source} has {text.depth} text layers"
        )
    if kept > 0:
        text = replace(text, depth=kept)
    expert_layers = _int(config, "num_expert_layers", where, -1)
    if expert_layers > 0 and expert_layers != text.depth:
        raise ModelLoadError(
            f"{where}: num_expert_layers={expert_layers} differs from the {text.depth} VLM layers "
            "(LeRobot's inference needs them equal)"
        )
    multiplier = config.get("expert_width_multiplier", 0.75)
    if not isinstance(multiplier, int | float) or multiplier <= 0:
        raise ModelLoadError(f"{where}: expert_width_multiplier={multiplier!r} must be a positive number")
    max_state, max_action = (
        _int(config, "max_state_dim", where, 32),
        _int(config, "max_action_dim", where, 32),
    )
    resize = config.get("resize_imgs_with_padding") or [backbone.vision.image_size] * 2
    if list(resize) != [backbone.vision.image_size] * 2:
        raise ModelLoadError(
            f"{where}: resize_imgs_with_padding={resize} differs from the vision tower's "
            f"{backbone.vision.image_size} px"
        )
    try:
        return SmolVLAConfig(
            vision=backbone.vision,
            vlm=text,
            expert=expert_config(text, float(multiplier)),
            vocab_size=backbone.vocab_size,
            scale_factor=backbone.scale_factor,
            self_attn_every_n_layers=_int(config, "self_attn_every_n_layers", where, 2),
            max_state_dim=max_state,
            max_action_dim=max_action,
            chunk_size=_int(config, "chunk_size", where, 50),
            num_steps=_int(config, "num_steps", where, 10),
            tokenizer_max_length=_int(config, "tokenizer_max_length", where, 48),
            min_period=float(config.get("min_period", 4e-3)),
            max_period=float(config.get("max_period", 4.0)),
        )
    except ValueError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Features (what phase B's policy maps cameras, state and actions from)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """config.json's input / output features. `cameras`: the VISUAL features in order, LeRobot's
    `empty_camera_*` fillers (added at save time for `empty_cameras`) excluded."""

    cameras: tuple[str, ...]
    camera_shapes: Mapping[str, tuple[int, ...]]
    state_dim: int
    action_dim: int
    empty_cameras: int
    normalization: Mapping[str, str]  # {"STATE": "MEAN_STD", "ACTION": ..., "VISUAL": ...}
    n_action_steps: int = 0  # actions LeRobot executes per chunk (0: not said)
    # the values' names when a feature lists them ("names", as LeRobot datasets' info.json write
    # them; LeRobot's own config.json does not): empty when not said
    state_names: tuple[str, ...] = ()
    action_names: tuple[str, ...] = ()


def read_features(config: Mapping[str, Any], where: Path) -> Features:
    inputs = config.get("input_features") or {}
    outputs = config.get("output_features") or {}
    if not isinstance(inputs, dict) or not isinstance(outputs, dict):
        raise ModelLoadError(f"{where}: input_features / output_features must be objects")

    def shape(feature: Any, name: str) -> tuple[int, ...]:
        if not isinstance(feature, dict) or not isinstance(feature.get("shape"), list):
            raise ModelLoadError(f"{where}: feature {name!r} has no shape")
        return tuple(int(s) for s in feature["shape"])

    cameras = tuple(
        k
        for k, v in inputs.items()
        if isinstance(v, dict) and v.get("type") == "VISUAL" and ".empty_camera_" not in k
    )
    if STATE not in inputs or ACTION not in outputs:
        raise ModelLoadError(f"{where}: needs the input feature {STATE!r} and the output feature {ACTION!r}")
    state_dim, action_dim = shape(inputs[STATE], STATE)[-1], shape(outputs[ACTION], ACTION)[-1]
    if state_dim > _int(config, "max_state_dim", where, 32) or action_dim > _int(
        config, "max_action_dim", where, 32
    ):
        raise ModelLoadError(
            f"{where}: state {state_dim} / action {action_dim} exceed max_state_dim / max_action_dim"
        )
    if not cameras:
        raise ModelLoadError(f"{where}: no VISUAL input feature (SmolVLA needs at least one camera)")
    normalization = config.get("normalization_mapping") or {}
    return Features(
        cameras=cameras,
        camera_shapes={k: shape(inputs[k], k) for k in cameras},
        state_dim=state_dim,
        action_dim=action_dim,
        empty_cameras=max(0, _int(config, "empty_cameras", where, 0)),
        normalization={str(k): str(v) for k, v in normalization.items()},
        n_action_steps=max(0, _int(config, "n_action_steps", where, 0)),
        state_names=_names(inputs[STATE], state_dim),
        action_names=_names(outputs[ACTION], action_dim),
    )


def _names(feature: Mapping[str, Any], size: int) -> tuple[str, ...]:
    """A feature's "names" when it lists one string per value (flat, or LeRobot's {"motors": [...]})."""
    names = feature.get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if isinstance(names, list) and len(names) == size and all(isinstance(n, str) for n in names):
        return tuple(names)
    return ()


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerSpec:
    path: Path  # tokenizer.json
    pad_token: str
    max_length: int
    padding: str  # "max_length" | "longest"
    truncation: bool = True


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def read_pad_token(tokenizer_json: Path) -> str:
    """The padding token from tokenizer_config.json (else special_tokens_map.json) beside
    tokenizer.json, as transformers' tokenizers read it."""
    missing = []
    for name in SPECIAL_TOKEN_FILES:
        file = tokenizer_json.parent / name
        if not file.is_file():
            missing.append(name)
            continue
        token = _token_text(read_json(file).get("pad_token"))
        if token is not None:
            return token
    if len(missing) == len(SPECIAL_TOKEN_FILES):
        raise ModelLoadError(
            f"missing {' and '.join(SPECIAL_TOKEN_FILES)} beside {tokenizer_json} (they name the "
            f"padding token). {TOKENIZER_HELP}"
        )
    raise ModelLoadError(f"{tokenizer_json.parent}: no pad_token in {', '.join(SPECIAL_TOKEN_FILES)}")


def load_tokenizer(spec: TokenizerSpec, vocab_size: int) -> tuple[Any, int]:
    """The `tokenizers.Tokenizer` and its padding id; ModelLoadError when it does not fit the model."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(spec.path))
    except Exception as exc:  # tokenizers raises plain Exceptions
        raise ModelLoadError(f"{spec.path} is not a tokenizer.json: {exc}") from None
    pad_id = tokenizer.token_to_id(spec.pad_token)
    if pad_id is None:
        raise ModelLoadError(f"{spec.path}: the padding token {spec.pad_token!r} is not in its vocabulary")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ModelLoadError(
            f"tokenizer {spec.path} has {size} tokens but the model's embedding has {vocab_size} rows: "
            "wrong tokenizer for this checkpoint"
        )
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer, int(pad_id)


def tokenize_prompt(
    tokenizer: Any,
    pad_id: int,
    task: str,
    max_length: int,
    padding: str = "max_length",
    truncation: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """LeRobot's SmolVLA prompt: the task with "\\n" appended unless it ends with one, encoded with
    the tokenizer's special tokens, cut to max_length, right-padded with the padding token to
    max_length ("max_length"; "longest" leaves one prompt unpadded).
    -> ids (T,) int64, mask (T,) bool."""
    text = task if task.endswith("\n") else task + "\n"
    ids = list(tokenizer.encode(text, add_special_tokens=True).ids)
    if truncation and len(ids) > max_length:
        ids = ids[:max_length]
    length = max_length if padding == "max_length" else len(ids)
    out = np.full(max(length, len(ids)), pad_id, dtype=np.int64)
    out[: len(ids)] = ids
    mask = np.zeros(out.shape, dtype=bool)
    mask[: len(ids)] = True
    return out, mask


def tokenizer_spec(
    path: Path, config: Mapping[str, Any], setting: str, vlm_dir: Path | None, where: Path
) -> TokenizerSpec:
    """Where the tokenizer is and how LeRobot's tokenizer step calls it (from the preprocessor's
    tokenizer_processor step when there is one, else config.json)."""
    step = lr.find_step(path, lr.PREPROCESSOR, TOKENIZER_STEP)
    step_config = (step or {}).get("config") or {}
    max_length = step_config.get("max_length", config.get("tokenizer_max_length", 48))
    padding = step_config.get("padding", config.get("pad_language_to", "longest"))
    if step_config.get("padding_side", "right") != "right" or padding not in ("max_length", "longest"):
        raise ModelLoadError(f"{where}: only right padding to 'max_length' or 'longest' is supported")
    search_dir = path if (path / TOKENIZER_FILE).is_file() or vlm_dir is None else vlm_dir
    tokenizer = find_tokenizer(search_dir, setting, TOKENIZER_FILE, TOKENIZER_HELP)
    return TokenizerSpec(
        tokenizer,
        read_pad_token(tokenizer),
        int(max_length),
        str(padding),
        bool(step_config.get("truncation", True)),
    )


# --------------------------------------------------------------------------------------------
# A checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: SmolVLAConfig
    features: Features
    weight_files: list[Path]
    names: NameMap
    tokenizer: TokenizerSpec
    normalizer: lr.NormalizerStep | None  # the preprocessor's (state and action statistics)
    unnormalizer: lr.NormalizerStep | None  # the postprocessor's (action statistics)
    backbone: str  # where the backbone's sizes came from

    def describe(self) -> str:
        cfg = self.config
        return (
            f"SmolVLA (vision {cfg.vision.width}x{cfg.vision.depth} @ {cfg.vision.image_size} px, "
            f"VLM {cfg.vlm.width}x{cfg.vlm.depth}, expert {cfg.expert.width}, chunk {cfg.chunk_size}, "
            f"state {self.features.state_dim}, action {self.features.action_dim}, "
            f"cameras {', '.join(self.features.cameras)})"
        )

    def load_network(self, device: str | torch.device, dtype: torch.dtype) -> SmolVLAModel:
        """The network built on `meta` and streamed from the weight files (common/weights.py):
        one error listing every missing, unexpected or mis-shaped tensor."""
        meta, where = build(self.config, device="meta"), str(self.path / "model.safetensors")
        files, names, what = self.weight_files, self.names, self.describe()
        model = load_weights(meta, files, names, device=device, dtype=dtype, where=where, what=what)
        assert isinstance(model, SmolVLAModel)
        return model

    def stats(self, feature: str, dataset: str = "") -> nz.Stats | None:
        """A feature's statistics as LeRobot applies them (`dataset`'s when one is chosen):
        actions from the postprocessor's unnormaliser (else the preprocessor's), the state from
        the preprocessor's."""
        order = (self.unnormalizer, self.normalizer) if feature == ACTION else (self.normalizer,)
        for step in order:
            if step is not None and (found := step.for_dataset(dataset).stats.get(feature)) is not None:
                return found
        return None

    def dataset_keys(self) -> list[str]:
        """The dataset keys the statistics are stored under (empty for a fine-tuned checkpoint)."""
        keys: set[str] = set()
        for step in (self.normalizer, self.unnormalizer):
            if step is not None:
                keys.update(step.datasets)
        return sorted(keys)

    def mode(self, feature: str) -> str:
        """The normalisation mode (preprocessing/normalize.py) of STATE or ACTION."""
        step = self.unnormalizer if feature == ACTION and self.unnormalizer else self.normalizer
        mapping = {"normalization_mapping": self.features.normalization}
        return lr.mode(mapping, step, FEATURE_TYPES[feature], "MEAN_STD", self.path / "config.json")

    def missing_stats(self, dataset: str = "") -> list[str]:
        """The features (STATE, ACTION) whose mode needs statistics that `dataset` ("" = the plain
        ones) lacks: LeRobot would silently skip their normalisation."""
        missing = []
        for feature in FEATURE_TYPES:
            stats = self.stats(feature, dataset) or nz.Stats()
            if any(getattr(stats, name) is None for name in nz.NEEDED[self.mode(feature)]):
                missing.append(feature)
        return missing

    def normalizers(self, dataset: str = "") -> tuple[nz.Normalizer, nz.Normalizer]:
        """(state, action) Normalizers with the plain statistics, or `dataset`'s (VLA_NORM_STATS_KEY).

        ModelLoadError, never normalised actions in silence, when a feature's mode needs statistics
        that are not there: naming them, and the dataset keys to choose from when the checkpoint
        keeps its statistics per dataset (the migrated lerobot/smolvla_base)."""
        keys = self.dataset_keys()
        if dataset and dataset not in keys:
            have = f"its dataset keys: {', '.join(keys)}" if keys else "it keeps no statistics per dataset"
            raise ModelLoadError(
                f"VLA_NORM_STATS_KEY={dataset!r} names no statistics in {self.path} ({have})"
            )
        missing = self.missing_stats(dataset)
        if missing and keys:
            raise ModelLoadError(
                f"{self.path}: no statistics for {' and '.join(missing)} under their own names: this "
                f"checkpoint keeps them per training dataset ({', '.join(keys)}), as the migrated "
                "lerobot/smolvla_base does; set VLA_NORM_STATS_KEY to the dataset whose statistics to "
                "serve with (LeRobot itself would return normalised actions without a word)"
            )
        if missing:
            raise ModelLoadError(
                f"{self.path}: no statistics for {' and '.join(missing)}, which config.json's "
                "normalization_mapping normalises: LeRobot saves them in "
                "policy_preprocessor_step_<i>_normalizer_processor.safetensors and "
                "policy_postprocessor_step_<i>_unnormalizer_processor.safetensors beside config.json "
                "(older checkpoints: normalize_* buffers in model.safetensors); without them the server "
                "would return normalised actions"
            )
        made = []
        for feature, size in ((STATE, self.features.state_dim), (ACTION, self.features.action_dim)):
            normalizer = self.normalizer_for(feature, dataset)
            if normalizer.size not in (0, size):
                raise ModelLoadError(
                    f"{self.path}: {feature} has {size} values but its statistics {normalizer.size}"
                )
            made.append(normalizer)
        return made[0], made[1]

    def normalizer_for(self, feature: str, dataset: str = "") -> nz.Normalizer:
        """The feature's Normalizer (LeRobot's convention, float32) with `dataset`'s statistics."""
        step = self.unnormalizer if feature == ACTION and self.unnormalizer else self.normalizer
        eps = step.eps if step is not None else nz.DEFAULT_EPS[nz.LEROBOT]
        stats = self.stats(feature, dataset)
        return lr.normalizer(self.mode(feature), stats, eps, f"{self.path} {feature}")


def backbone_for(
    path: Path, config: Mapping[str, Any], tokenizer_setting: str, where: Path
) -> tuple[Backbone, Path | None]:
    """The backbone's sizes and the local directory `vlm_model_name` names (if it exists here).

    Looked up in order: a SmolVLM config.json beside VLA_TOKENIZER_PATH's tokenizer, in the
    `vlm_model_name` directory (a path, or a directory of that name inside the checkpoint
    directory, e.g. <dir>/HuggingFaceTB/SmolVLM2-500M-Video-Instruct/), then the named size
    `vlm_model_name` stands for (KNOWN_BACKBONES)."""
    name = str(config.get("vlm_model_name", "HuggingFaceTB/SmolVLM2-500M-Video-Instruct"))
    vlm_dir = next((d for d in (Path(name).expanduser(), path / name) if d.is_dir()), None)
    candidates = []
    if tokenizer_setting:
        given = Path(tokenizer_setting).expanduser()
        candidates.append((given if given.is_dir() else given.parent) / "config.json")
    if vlm_dir is not None:
        candidates.append(vlm_dir / "config.json")
    for candidate in candidates:
        if candidate.is_file() and candidate.resolve() != where.resolve():
            data = read_json(candidate)
            if data.get("model_type") in ("smolvlm", "idefics3"):
                return read_backbone(candidate), vlm_dir
    named = named_backbone(name)
    if named is None:
        raise ModelLoadError(
            f"{where}: vlm_model_name={name!r} is not a known backbone ({', '.join(KNOWN_BACKBONES)}) "
            "and no SmolVLM config.json was found beside VLA_TOKENIZER_PATH or in that directory"
        )
    return named, vlm_dir


def load(path: Path, *, tokenizer_path: str = "") -> Checkpoint:
    """Read a SmolVLA checkpoint's config, statistics, tokenizer location and weight layout (not
    the weights)."""
    if not path.is_dir():
        raise ModelLoadError(f"checkpoint directory {path} does not exist")
    where = path / "config.json"
    config = read_json(where)
    if config.get("type") != TYPE:
        raise ModelLoadError(f"{where}: type={config.get('type')!r} is not a smolvla policy")
    backbone, vlm_dir = backbone_for(path, config, tokenizer_path, where)
    cfg = smolvla_config(config, backbone, where)
    features = read_features(config, where)
    files = find_weight_files(path)
    layout = read_layout(files)
    canon = {canonical(k) for k in layout}
    embed_key = EMBED_KEY if EMBED_KEY in canon or LM_HEAD not in canon else LM_HEAD
    names = lerobot_names(layout, embed_key)
    normalizer = lr.read_step(path, lr.PREPROCESSOR, lr.NORMALIZER)
    unnormalizer = lr.read_step(path, lr.POSTPROCESSOR, lr.UNNORMALIZER)
    if normalizer is None and unnormalizer is None:
        normalizer, unnormalizer = lr.read_legacy(layout)
    return Checkpoint(
        path=path,
        config=cfg,
        features=features,
        weight_files=files,
        names=names,
        tokenizer=tokenizer_spec(path, config, tokenizer_path, vlm_dir, where),
        normalizer=normalizer,
        unnormalizer=unnormalizer,
        backbone=backbone.source,
    )
