"""The model registry: which class serves a checkpoint.

A family (VLA_MODEL_TYPE) has a default class and may serve checkpoint variants with their own
class, told apart by what the checkpoint says about itself: config.json's "type" (LeRobot's
policy configs) or "model_type" (Hugging Face / NVIDIA), or the files beside it (`detect`).
When VLA_MODEL_TYPE is not set, the checkpoint's own kind picks the family; when it is set and
the checkpoint says it belongs to another family, the server refuses to start, naming both.

Only real backends are listed (config.MODEL_TYPES names the families). Classes are imported
lazily so that `vla-inference config` and the transport tests do not pay for importing torch
model code. Models receive ModelSettings, the part of the settings they need.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vla_inference.config import MODEL_TYPES, Settings
from vla_inference.models.base import ModelLoadError, ModelSettings, VLAModel


@dataclass(frozen=True)
class Family:
    """One VLA_MODEL_TYPE: its class, the checkpoint kinds it serves, and its variants."""

    default: str  # "module:Class"
    kinds: tuple[str, ...] = ()  # config.json "type" / "model_type" values of its checkpoints
    variants: Mapping[str, str] = field(default_factory=dict)  # kind -> "module:Class"
    # "module:function" (checkpoint dir, ModelSettings) -> "module:Class" of a variant told apart by
    # its files, or "" (the kind's class)
    detect: str = ""


FAMILIES: dict[str, Family] = {
    "pi0": Family(
        "vla_inference.models.pi0.policy:Pi0Policy",
        kinds=("pi0", "pi05", "pi0_fast"),
        variants={"pi0_fast": "vla_inference.models.pi0_fast.policy:Pi0FastPolicy"},
    ),
    "openvla": Family(
        "vla_inference.models.openvla.policy:OpenVLAPolicy",
        kinds=("openvla",),
        detect="vla_inference.models.openvla.policy:variant_class",  # OpenVLA-OFT
    ),
    "groot": Family(
        "vla_inference.models.groot.policy:GrootPolicy",
        kinds=("gr00t_n1_5", "groot", "Gr00tN1d7"),
        variants={"Gr00tN1d7": "vla_inference.models.groot.n17_policy:Groot17Policy"},  # GR00T N1.7
    ),
    "smolvla": Family("vla_inference.models.smolvla.policy:SmolVLAPolicy", kinds=("smolvla",)),
}
assert set(FAMILIES) == set(MODEL_TYPES), "config.MODEL_TYPES and the registry must agree"


def available_model_types() -> list[str]:
    return sorted(FAMILIES)


def checkpoint_kind(path: str | Path) -> str:
    """What a checkpoint directory's config.json says it is ("" when it has none or says nothing)."""
    if not path:
        return ""
    config = Path(path).expanduser() / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""  # the family's own loader names the problem
    if not isinstance(data, dict):
        return ""
    kind = data.get("type") or data.get("model_type") or ""
    return kind if isinstance(kind, str) else ""


def family_of(kind: str) -> str | None:
    return next((name for name, family in FAMILIES.items() if kind in family.kinds), None)


def _load(target: str) -> object:
    module_name, name = target.split(":")
    return getattr(importlib.import_module(module_name), name)


def model_class(
    model_type: str, kind: str = "", path: str = "", settings: ModelSettings | None = None
) -> type[VLAModel]:
    """The class of family `model_type` for a checkpoint of `kind` at `path`."""
    try:
        family = FAMILIES[model_type]
    except KeyError:
        known = ", ".join(available_model_types())
        raise ValueError(f"unknown model type {model_type!r}; available: {known}") from None
    target = family.variants.get(kind, "")
    if not target and family.detect and path:
        detect = _load(family.detect)
        assert callable(detect)
        target = detect(Path(path).expanduser(), settings or ModelSettings(model_type=model_type))
    cls = _load(target or family.default)
    if not (isinstance(cls, type) and issubclass(cls, VLAModel)):
        raise TypeError(f"{target or family.default} is not a VLAModel")
    return cls


def resolve(settings: Settings) -> tuple[str, type[VLAModel]]:
    """(the family, its class) for the settings: VLA_MODEL_TYPE, or the checkpoint's own kind when
    VLA_MODEL_TYPE is not set; ModelLoadError when the two disagree."""
    kind = checkpoint_kind(settings.model_path)
    owner = family_of(kind) if kind else None
    model_type = settings.model_type
    if owner is not None and owner != model_type:
        if settings.explicitly_set("model_type"):
            raise ModelLoadError(
                f"VLA_MODEL_TYPE={model_type} but {settings.model_path}/config.json says it is a {kind!r} "
                f"checkpoint, served by VLA_MODEL_TYPE={owner}; set that, or leave VLA_MODEL_TYPE unset"
            )
        model_type = owner
    model_settings = dataclasses.replace(ModelSettings.of(settings), model_type=model_type)
    return model_type, model_class(model_type, kind, settings.model_path, model_settings)


def create_model(settings: Settings) -> VLAModel:
    """Instantiate (not load) the class that serves the settings' checkpoint."""
    model_type, cls = resolve(settings)
    return cls(dataclasses.replace(ModelSettings.of(settings), model_type=model_type))
