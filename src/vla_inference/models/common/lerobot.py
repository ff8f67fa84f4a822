"""LeRobot's normaliser files, one reader for every family LeRobot saves (pi0 / pi05, SmolVLA,
pi0-FAST):

    policy_preprocessor.json     {"steps": [..., {"registry_name": "normalizer_processor",
                                   "config": {"eps", "features", "norm_map"}, "state_file":
                                   "policy_preprocessor_step_<i>_normalizer_processor.safetensors"}]}
    policy_postprocessor.json    the same with "unnormalizer_processor"
    <state_file>                 "<feature>.<stat>" tensors: "observation.state.mean", "action.q99", ...;
                                 a checkpoint trained on several datasets (the migrated
                                 lerobot/smolvla_base) holds "<dataset>.buffer.<feature>.<stat>" only:
                                 LeRobot then finds no statistics under the feature's name and
                                 silently skips the normalisation, so a family must choose a dataset
                                 (`NormalizerStep.datasets`, `for_dataset`) or refuse
    model.safetensors            checkpoints from before the processor pipelines (LeRobot < 0.4) keep
                                 them as buffers: "normalize_inputs.buffer_observation_state.mean",
                                 "normalize_targets.buffer_action.std", "unnormalize_outputs.buffer_action.*"
                                 (`read_legacy`)

The step's index varies between releases, so the step is found by its registry name, and its
file by the step's "state_file" (else by the file name pattern). Modes come from config.json's
"normalization_mapping" (feature type -> MEAN_STD | QUANTILES | MIN_MAX | IDENTITY), else from the
step's "norm_map". Only JSON and safetensors are read. `state_and_action` gives a policy's two
normalisers (the state's from the preprocessor, the action's from the postprocessor).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common.weights import TensorEntry, read_json
from vla_inference.preprocessing import normalize as nz

STATE = "observation.state"
ACTION = "action"
PREPROCESSOR = "policy_preprocessor.json"
POSTPROCESSOR = "policy_postprocessor.json"
NORMALIZER = "normalizer_processor"
UNNORMALIZER = "unnormalizer_processor"
MODES = {"MEAN_STD": nz.MEAN_STD, "QUANTILES": nz.QUANTILE, "MIN_MAX": nz.MIN_MAX, "IDENTITY": nz.IDENTITY}
STAT_NAMES = ("mean", "std", "q01", "q99", "min", "max")
DATASET_MARK = ".buffer."  # "<dataset>.buffer.<feature>": statistics kept per training dataset
LEGACY_PRE = ("normalize_inputs", "normalize_targets")  # model.safetensors buffers before LeRobot 0.4
LEGACY_POST = ("unnormalize_outputs",)


@dataclass(frozen=True)
class NormalizerStep:
    """One (un)normaliser step of a LeRobot processor: its statistics by feature and settings."""

    stats: Mapping[str, nz.Stats]  # "observation.state" / "action" -> statistics
    eps: float = nz.DEFAULT_EPS[nz.LEROBOT]
    norm_map: Mapping[str, str] = field(default_factory=dict)  # feature type -> LeRobot mode name
    keys: tuple[str, ...] = ()  # every tensor name of its file (for messages about what is there)
    # "<dataset>" -> feature -> statistics, from "<dataset>.buffer.<feature>.<stat>" tensors
    datasets: Mapping[str, Mapping[str, nz.Stats]] = field(default_factory=dict)
    source: str = ""  # the file the statistics were read from

    def for_dataset(self, dataset: str) -> NormalizerStep:
        """This step with `dataset`'s statistics as its own ("" = as it is; an unknown dataset
        gives no statistics)."""
        if not dataset:
            return self
        return replace(self, stats=dict(self.datasets.get(dataset, {})))


def find_step(path: Path, processor: str, registry: str) -> dict[str, Any] | None:
    """The step `registry` of the pipeline file `processor` in `path` (None without either)."""
    file = path / processor
    if not file.is_file():
        return None
    for step in read_json(file).get("steps", []):
        if isinstance(step, dict) and step.get("registry_name") == registry:
            return step
    return None


def read_step(path: Path, processor: str, registry: str) -> NormalizerStep | None:
    """The step `registry` of `processor` with its statistics; None when the checkpoint has
    neither the step nor its statistics file."""
    step = find_step(path, processor, registry) or {}
    config = step.get("config") or {}
    name = step.get("state_file")
    prefix = processor.removesuffix(".json")
    if isinstance(name, str) and name:
        state = path / name
        if not state.is_file():
            raise ModelLoadError(f"{path / processor} names {name}, which is not in {path}")
    else:
        found = sorted(path.glob(f"{prefix}_step_*_{registry}.safetensors"))
        if not found:
            return None
        state = found[0]
    eps = config.get("eps", nz.DEFAULT_EPS[nz.LEROBOT])
    if not isinstance(eps, int | float) or eps <= 0:
        eps = nz.DEFAULT_EPS[nz.LEROBOT]
    norm_map = config.get("norm_map") or {}
    return grouped(_read_tensors(state), str(state), float(eps), dict(norm_map))


def grouped(
    tensors: Mapping[str, Any], source: str, eps: float, norm_map: Mapping[str, str]
) -> NormalizerStep:
    """ "<feature>.<stat>" / "<dataset>.buffer.<feature>.<stat>" vectors -> a NormalizerStep."""
    by_feature: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        feature, _, stat = key.rpartition(".")
        if stat in STAT_NAMES and feature:
            by_feature.setdefault(feature, {})[stat] = value
    plain: dict[str, nz.Stats] = {}
    datasets: dict[str, dict[str, nz.Stats]] = {}
    name = Path(source).name
    try:
        for feature, values in by_feature.items():
            stats = nz.Stats.of(values, f"{name}:{feature}")
            dataset, mark, own = feature.partition(DATASET_MARK)
            if mark:
                datasets.setdefault(dataset, {})[own] = stats
            else:
                plain[feature] = stats
    except nz.StatsError as exc:
        raise ModelLoadError(str(exc)) from None
    return NormalizerStep(plain, eps, norm_map, tuple(sorted(tensors)), datasets, source)


def read_legacy(layout: Mapping[str, TensorEntry]) -> tuple[NormalizerStep | None, NormalizerStep | None]:
    """The (normaliser, unnormaliser) statistics that checkpoints from before LeRobot's processor
    pipelines keep in model.safetensors as buffers ("normalize_inputs.buffer_observation_state.mean":
    the feature is the name after "buffer_" with "_" read as "."); (None, None) without any."""
    found: dict[tuple[str, ...], dict[str, Any]] = {LEGACY_PRE: {}, LEGACY_POST: {}}
    for key, entry in layout.items():
        match = re.fullmatch(r"(\w+)\.buffer_(\w+)\.(\w+)", key.replace("_orig_mod.", ""))
        if match is None:
            continue
        group, feature, stat = match.groups()
        for groups, tensors in found.items():
            if group in groups:
                tensors[key] = (f"{feature.replace('_', '.')}.{stat}", entry)
    steps: list[NormalizerStep | None] = []
    for tensors in found.values():
        if not tensors:
            steps.append(None)
            continue
        values = {name: _read_tensors(entry.file, [key])[key] for key, (name, entry) in tensors.items()}
        source = f"{next(iter(tensors.values()))[1].file} (normalize_* buffers)"
        steps.append(grouped(values, source, nz.DEFAULT_EPS[nz.LEROBOT], {}))
    return steps[0], steps[1]


def _read_tensors(file: Path, keys: Sequence[str] | None = None) -> dict[str, Any]:
    """`keys` (default: every tensor) of a safetensors file as float64 vectors."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys()) if keys is None else keys
            return {key: f.get_tensor(key).double().numpy().reshape(-1) for key in names}
    except Exception as exc:  # safetensors raises its own error types
        raise ModelLoadError(f"cannot read {file}: not a safetensors file ({exc})") from None


def mode(
    config: Mapping[str, Any], step: NormalizerStep | None, feature_type: str, default: str, where: Path
) -> str:
    """The normalisation mode of a feature type ("STATE", "ACTION"): config.json's
    normalization_mapping, else the step's norm_map, else `default` (a LeRobot mode name)."""
    mapping = config.get("normalization_mapping") or {}
    name = mapping.get(feature_type) or (step.norm_map.get(feature_type) if step else None) or default
    if name not in MODES:
        raise ModelLoadError(f"{where}: normalization_mapping.{feature_type}={name!r} is not supported")
    return MODES[name]


def normalizer(mode_name: str, stats: nz.Stats | None, eps: float, where: str) -> nz.Normalizer:
    """A LeRobot-convention Normalizer; ModelLoadError when the statistics do not fit the mode."""
    try:
        return nz.Normalizer(mode_name, stats or nz.Stats(), nz.LEROBOT, eps)
    except nz.StatsError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None


def state_and_action(
    path: Path, config: Mapping[str, Any], default: str
) -> tuple[nz.Normalizer, nz.Normalizer] | None:
    """A LeRobot policy's state and action normalisers: the state's statistics from the
    preprocessor's normaliser step, the action's from the postprocessor's unnormaliser (else the
    preprocessor's), each with its step's eps; modes by `mode` (`default`: the policy's LeRobot
    default, e.g. "MEAN_STD"). None when the checkpoint has no statistics at all."""
    where = path / "config.json"
    pre = read_step(path, PREPROCESSOR, NORMALIZER)
    post = read_step(path, POSTPROCESSOR, UNNORMALIZER)
    state_stats = pre.stats.get(STATE) if pre else None
    action_step = post if post is not None and ACTION in post.stats else pre
    action_stats = action_step.stats.get(ACTION) if action_step else None
    if state_stats is None and action_stats is None:
        return None
    made = []
    for label, feature_type, stats, step in (
        (STATE, "STATE", state_stats, pre),
        (ACTION, "ACTION", action_stats, action_step or post),
    ):
        mode_name = mode(config, step, feature_type, default, where)
        if stats is None and mode_name != nz.IDENTITY:
            raise ModelLoadError(f"{path}: no '{label}' statistics in the normalizer files")
        eps = step.eps if step is not None else nz.DEFAULT_EPS[nz.LEROBOT]
        made.append(normalizer(mode_name, stats, eps, f"{path} {label}"))
    return made[0], made[1]
