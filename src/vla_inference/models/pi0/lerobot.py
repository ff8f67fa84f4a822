"""LeRobot's pi0 / pi05 checkpoint format (huggingface/lerobot, policies/pi0 and pi05).

    <dir>/config.json              {"type": "pi0" | "pi05", chunk_size, max_action_dim, max_state_dim,
                                    tokenizer_max_length, paligemma_variant, action_expert_variant,
                                    image_resolution, input_features, output_features,
                                    normalization_mapping, num_inference_steps, empty_cameras, ...}
    <dir>/model.safetensors        the openpi names prefixed with "model."
    <dir>/policy_preprocessor_step_<i>_normalizer_processor.safetensors    "observation.state.mean", ...
    <dir>/policy_postprocessor_step_0_unnormalizer_processor.safetensors   "action.mean", ...
    <dir>/policy_preprocessor.json / policy_postprocessor.json              the normalizer's eps

LeRobot's files hold the PaliGemma token embedding under both its names; the LM head copy is
never trained there, so "embed_tokens" is the one read. LeRobot checkpoints ship no tokenizer:
VLA_TOKENIZER_PATH must name PaliGemma's tokenizer.model.
"""

from __future__ import annotations

from pathlib import Path

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common import lerobot as lr
from vla_inference.models.common.tokenizers import find_tokenizer
from vla_inference.models.common.weights import read_json
from vla_inference.models.pi0.checkpoint import (
    EMBED_ALIAS,
    EMBED_KEY,
    LEROBOT,
    TOKENIZER_HELP,
    Checkpoint,
    EmbodimentNorm,
    gemma_variants,
    openpi_names,
    positive_int,
    variant_from_keys,
    vocab_size,
    weights_of,
)
from vla_inference.models.pi0.model import IMAGE_SLOTS, SIGLIP_VARIANTS, Pi0Config

PREFIX = "model."


def _norms(path: Path, config: dict, pi05: bool, norm_stats_key: str) -> dict[str, EmbodimentNorm]:
    """The checkpoint's state and action normalisers (LeRobot's processor files), as one
    embodiment named VLA_NORM_STATS_KEY or "default"; empty when it has no statistics at all."""
    made = lr.state_and_action(path, config, "QUANTILES" if pi05 else "MEAN_STD")
    if made is None:
        return {}
    return {norm_stats_key or "default": EmbodimentNorm(*made)}


def load_lerobot(path: Path, *, tokenizer_path: str = "", norm_stats_key: str = "") -> Checkpoint:
    where = path / "config.json"
    config = read_json(where)
    kind = config.get("type")
    if kind not in ("pi0", "pi05"):
        raise ModelLoadError(f"{where}: type={kind!r} is not a pi0 / pi05 policy")
    pi05 = kind == "pi05"
    for flag in ("use_relative_actions", "use_proprioceptive_memory", "use_visual_memory"):
        if config.get(flag):
            raise ModelLoadError(f"{where}: {flag}=true is not supported by this server")
    files, layout = weights_of(path)
    from_keys = variant_from_keys(layout, PREFIX)
    if from_keys is not None and from_keys != pi05:
        raise ModelLoadError(
            f"{where}: type={kind} but the weights are a {'pi0.5' if from_keys else 'pi0'} model"
        )
    max_action = positive_int(config, "max_action_dim", 32, where)
    if positive_int(config, "max_state_dim", 32, where) != max_action:
        raise ModelLoadError(f"{where}: max_state_dim must equal max_action_dim (both pad to one size)")
    variants = gemma_variants(config, where)
    size = SIGLIP_VARIANTS[variants["vision_variant"]].image_size
    resolution = config.get("image_resolution", [size, size])
    if list(resolution) != [size, size]:
        raise ModelLoadError(
            f"{where}: image_resolution={resolution} is not supported (expected the tower's size)"
        )
    embed_key = PREFIX + (EMBED_ALIAS if PREFIX + EMBED_ALIAS in layout else EMBED_KEY)
    cfg = Pi0Config(
        pi05=pi05,
        **variants,
        vocab_size=vocab_size(layout, embed_key),
        action_dim=max_action,
        action_horizon=positive_int(config, "chunk_size", 50, where),
        max_token_len=positive_int(config, "tokenizer_max_length", 200 if pi05 else 48, where),
    )
    inputs = config.get("input_features") or {}
    image_keys = [k for k, v in inputs.items() if isinstance(v, dict) and v.get("type") == "VISUAL"]
    slots = tuple(k.removeprefix("observation.images.") for k in image_keys) or IMAGE_SLOTS
    empty = positive_int(config, "empty_cameras", 0, where) if config.get("empty_cameras") else 0
    slots += tuple(f"empty_camera_{i}" for i in range(empty))
    tokenizer = find_tokenizer(
        path, tokenizer_path, "tokenizer.model", TOKENIZER_HELP + " LeRobot checkpoints ship no tokenizer."
    )
    return Checkpoint(
        LEROBOT,
        path,
        cfg,
        files,
        openpi_names(embed_key.removeprefix(PREFIX), PREFIX),
        _norms(path, config, pi05, norm_stats_key),
        tokenizer,
        image_slots=slots,
        num_steps=positive_int(config, "num_inference_steps", 10, where),
    )
