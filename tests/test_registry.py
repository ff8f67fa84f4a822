"""Which class serves a checkpoint (models/registry.py): VLA_MODEL_TYPE, or the checkpoint's kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vla_inference.config import Settings
from vla_inference.models import registry
from vla_inference.models.base import ModelLoadError
from vla_inference.models.groot.policy import GrootPolicy
from vla_inference.models.openvla.policy import OpenVLAPolicy
from vla_inference.models.pi0.policy import Pi0Policy


def _checkpoint(tmp_path: Path, **config: object) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_the_checkpoints_kind_picks_the_family_when_the_type_is_not_set(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, model_type="openvla")
    model_type, cls = registry.resolve(Settings(model_path=path))
    assert (model_type, cls) == ("openvla", OpenVLAPolicy)
    assert registry.create_model(Settings(model_path=path)).model_id == f"openvla/{tmp_path.name}"
    assert registry.resolve(Settings(model_path=_checkpoint(tmp_path, type="groot")))[1] is GrootPolicy


def test_a_type_that_contradicts_the_checkpoint_is_refused_naming_both(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, model_type="gr00t_n1_5")
    with pytest.raises(
        ModelLoadError, match=r"VLA_MODEL_TYPE=pi0 but .* 'gr00t_n1_5' checkpoint.*VLA_MODEL_TYPE=groot"
    ):
        registry.resolve(Settings(model_type="pi0", model_path=path))


def test_checkpoints_that_say_nothing_keep_the_type(tmp_path: Path) -> None:
    assert registry.resolve(Settings())[1] is Pi0Policy  # the embedded default
    path = _checkpoint(tmp_path, action_dim=32)  # openpi's config.json names no type
    assert registry.resolve(Settings(model_path=path)) == ("pi0", Pi0Policy)
    assert registry.checkpoint_kind(tmp_path / "missing") == ""
    with pytest.raises(ValueError, match="available: groot, openvla, pi0"):
        registry.model_class("nope")
