"""The model registry: VLA_MODEL_TYPE -> model class.

Only real backends are listed (config.MODEL_TYPES names them). Classes are imported lazily so
that `vla-inference config` and the transport tests do not pay for importing torch model code.
Models receive ModelSettings, the part of the settings they need.
"""

from __future__ import annotations

import importlib

from vla_inference.config import MODEL_TYPES, Settings
from vla_inference.models.base import ModelSettings, VLAModel

# model type -> "module:ClassName"
MODEL_CLASSES: dict[str, str] = {
    "pi0": "vla_inference.models.pi0.policy:Pi0Policy",
    "openvla": "vla_inference.models.openvla.policy:OpenVLAPolicy",
    "groot": "vla_inference.models.groot.policy:GrootPolicy",
}
assert set(MODEL_CLASSES) == set(MODEL_TYPES), "config.MODEL_TYPES and the registry must agree"


def available_model_types() -> list[str]:
    return sorted(MODEL_CLASSES)


def model_class(model_type: str) -> type[VLAModel]:
    try:
        target = MODEL_CLASSES[model_type]
    except KeyError:
        known = ", ".join(available_model_types())
        raise ValueError(f"unknown model type {model_type!r}; available: {known}") from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, VLAModel)):
        raise TypeError(f"{target} is not a VLAModel")
    return cls


def create_model(settings: Settings) -> VLAModel:
    """Instantiate (not load) the model class that settings.model_type names."""
    return model_class(settings.model_type)(ModelSettings.of(settings))
