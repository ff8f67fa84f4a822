"""OpenVLA-OFT checkpoint directories: reading them (safetensors and JSON only) and converting upstream's
`.pt` files once, offline.

A directory as upstream's fine-tuning writes it (vla-scripts/finetune.py):

  config.json, model-*.safetensors + index, tokenizer.model, ...   the merged OpenVLA (checkpoint.py reads it)
  dataset_statistics.json                  per dataset: action and proprio q01/q99/min/max (+ action mask)
  action_head--{step}_checkpoint.pt        torch.save(DDP(L1RegressionActionHead).state_dict()): a pickle,
  proprio_projector--{step}_checkpoint.pt  keys `module.model.fc1.weight`, `module.fc1.weight`, ...

`convert_oft_checkpoint` (the `vla-inference convert oft DIR` command) writes beside them

  action_head--{step}_checkpoint.safetensors       the same tensors, DDP's `module.` stripped
  proprio_projector--{step}_checkpoint.safetensors
  oft_config.json                                  what no tensor says: chunk size, number of images,
                                                   normalisation; and the sha256 of each converted .pt

and the server reads only those: a directory whose head or projector exists only as `.pt` is refused with
the command to run. Not supported, refused with one line: FiLM (`vision_backbone--*` beside the head,
ALOHA) and the diffusion head (`noisy_action_projector--*`, `noise_predictor.*` tensors).

Dimensions come from the tensors (D: the head's fc2 rows, P: the projector's fc1 columns, W: config.json),
checked against the dataset statistics. What no tensor says (the chunk size, the image count, the
normalisation) comes, in this order, from the VLA_OFT_* settings (`OFTChoices`), oft_config.json, and
upstream's platform table matched by (D, P) (prismatic/vla/constants.py). The normalisers are the shared
preprocessing/normalize.py's `bounds` convention with OFT's eps 1e-8 (q01/q99, or min/max for `bounds`).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common.weights import NameMap, Source, TensorEntry, read_json, read_layout
from vla_inference.models.openvla.checkpoint import (
    STATISTICS_FILE,
    CheckpointInfo,
    build_and_load,
    openvla_names,
    read_checkpoint,
)
from vla_inference.models.openvla.oft import OFTConfig, OpenVLAOFT
from vla_inference.preprocessing import normalize as nz

HEAD = "action_head"
PROPRIO = "proprio_projector"
FILM = "vision_backbone"  # FiLM: the whole FiLM-wrapped vision backbone
DIFFUSION = "noisy_action_projector"
OFT_CONFIG_FILE = "oft_config.json"
CONVERT_COMMAND = "vla-inference convert oft {}"
DDP_PREFIX = "module."
BOUNDS_Q99 = "bounds_q99"
BOUNDS = "bounds"
NORMALIZATIONS = {BOUNDS_Q99: nz.QUANTILE, BOUNDS: nz.MIN_MAX}  # upstream's name -> the normaliser's mode
RANGE_EPS = 1e-8  # upstream adds it to (high - low) when normalising proprio and un-normalising actions
_COMPONENT = re.compile(r"^(?P<name>[a-z_]+)--(?P<step>[^/]+)_checkpoint\.(?P<ext>pt|safetensors)$")


@dataclass(frozen=True)
class Platform:
    """Upstream's per-platform constants (prismatic/vla/constants.py) and evaluation image count."""

    chunk_size: int
    action_dim: int
    proprio_dim: int
    num_images: int | None  # None: upstream ships no evaluation for it; must be given at conversion
    normalization: str


PLATFORMS: dict[str, Platform] = {
    "libero": Platform(8, 7, 8, 2, BOUNDS_Q99),  # run_libero_eval.py: 2 images
    "aloha": Platform(25, 14, 14, 3, BOUNDS),  # ALOHA.md: --num_images_in_input 3
    "bridge": Platform(5, 7, 7, None, BOUNDS_Q99),
}
MAX_IMAGES = 3  # cameras the server can name: base, left_wrist, right_wrist
# What no tensor says: (oft_config.json key, the setting that overrides it, the OFTChoices / Platform field)
CHOSEN = (
    ("num_actions_chunk", "VLA_OFT_CHUNK_SIZE", "chunk_size"),
    ("num_images_in_input", "VLA_OFT_NUM_IMAGES", "num_images"),
    ("normalization", "VLA_OFT_NORMALIZATION", "normalization"),
)


@dataclass(frozen=True)
class OFTChoices:
    """What no tensor says, as the operator chose it (VLA_OFT_CHUNK_SIZE, VLA_OFT_NUM_IMAGES,
    VLA_OFT_NORMALIZATION); None = from oft_config.json, else upstream's platform table."""

    chunk_size: int | None = None
    num_images: int | None = None
    normalization: str | None = None


@dataclass(frozen=True)
class OFTCheckpointInfo:
    base: CheckpointInfo  # the merged OpenVLA part (config, image spec, safetensors shards)
    config: OFTConfig
    normalization: str  # bounds_q99 | bounds
    actions: dict[str, nz.Normalizer]  # per dataset (the unnorm_key)
    proprio: dict[str, nz.Normalizer]  # per dataset; empty without a proprio projector
    head_file: Path
    proprio_file: Path | None

    @property
    def path(self) -> Path:
        return self.base.path

    @property
    def weight_files(self) -> list[Path]:
        """Every safetensors file the model reads: the merged shards, the head, the projector."""
        extra = [f for f in (self.head_file, self.proprio_file) if f is not None]
        return [*self.base.weight_files, *extra]


# ---- finding the component files ----------------------------------------------------------------


def component_files(path: Path, name: str) -> dict[str, list[Path]]:
    """{"pt": [...], "safetensors": [...]}: files `{name}--{step}_checkpoint.{ext}` in `path`."""
    found: dict[str, list[Path]] = {"pt": [], "safetensors": []}
    for file in sorted(path.iterdir()) if path.is_dir() else []:
        match = _COMPONENT.match(file.name)
        if match and match["name"] == name and file.is_file():
            found[match["ext"]].append(file)
    return found


def _one(path: Path, files: list[Path], name: str) -> Path | None:
    if len(files) > 1:
        raise ModelLoadError(
            f"{path} holds {len(files)} {name} checkpoints ({', '.join(f.name for f in files)}); keep one"
        )
    return files[0] if files else None


def is_oft_checkpoint(path: str | Path) -> bool:
    """An OFT directory: an action head file (converted or not) beside the merged OpenVLA weights."""
    files = component_files(Path(path), HEAD)
    return bool(files["pt"] or files["safetensors"])


UNSUPPORTED = {
    FILM: "uses FiLM (language-conditioned vision, OFT+ for ALOHA), which vla-inference does not implement",
    DIFFUSION: "has a diffusion action head; only the L1 regression head is supported",
}


def _refuse_unsupported(path: Path) -> None:
    for name, why in UNSUPPORTED.items():
        files = component_files(path, name)
        if files["pt"] or files["safetensors"]:
            shown = (files["pt"] + files["safetensors"])[0].name
            raise ModelLoadError(f"{path / shown}: this OpenVLA-OFT checkpoint {why}")


def _converted(path: Path, name: str, required: bool) -> Path | None:
    files = component_files(path, name)
    converted = _one(path, files["safetensors"], name)
    if converted is not None:
        return converted
    pickled = _one(path, files["pt"], name)
    if pickled is not None:
        raise ModelLoadError(
            f"{pickled} is a PyTorch pickle, which the server never loads; convert it once with "
            f"`{CONVERT_COMMAND.format(path)}` (writes {pickled.stem}.safetensors beside it)"
        )
    if required:
        raise ModelLoadError(f"no {name}--<step>_checkpoint.safetensors (or .pt) in {path}")
    return None


# ---- name maps ----------------------------------------------------------------------------------


def head_names() -> NameMap:
    """Our `action_head.*` -> the converted head file's names (upstream's, `module.` stripped)."""
    return NameMap(lambda name, shape: [Source(name.removeprefix(HEAD + "."))])


def proprio_names() -> NameMap:
    """Our `proprio_projector.*` -> the converted projector file's names (`fc1.weight`, ...)."""
    return NameMap(lambda name, shape: [Source(name.removeprefix(PROPRIO + "."))])


def oft_names(cfg: OFTConfig) -> NameMap:
    """The whole model over the merged shards + the head file + the projector file (disjoint names:
    `vision_backbone.` / `projector.` / `language_model.` vs `model.` vs `fc1.`/`fc2.`). The merged
    checkpoint's lm_head is never built."""
    base = openvla_names(cfg.vla)
    by_prefix = {HEAD: head_names(), PROPRIO: proprio_names()}

    def sources(name: str, shape: tuple[int, ...]) -> list[Source]:
        head = name.partition(".")[0]
        return by_prefix[head].sources(name, shape) if head in by_prefix else base.sources(name, shape)

    def unused(key: str) -> bool:
        return key == "language_model.lm_head.weight" or base.unused(key)

    return NameMap(sources, unused)


# ---- reading ------------------------------------------------------------------------------------


def _shape(layout: Mapping[str, TensorEntry], key: str, file: Path) -> tuple[int, ...]:
    if key not in layout:
        if any(k.startswith("noise_predictor.") for k in layout):
            raise ModelLoadError(f"{file}: a diffusion action head; only the L1 regression head is supported")
        raise ModelLoadError(
            f"{file} has no tensor {key!r}: not an OpenVLA-OFT L1 regression head / projector"
        )
    return layout[key].shape


def head_dims(file: Path, width: int) -> tuple[int, int]:
    """(action dim D, MLP-ResNet blocks) from the converted head's tensor shapes."""
    layout = read_layout([file])
    out_dim, hidden = _shape(layout, "model.fc2.weight", file)
    (in_dim,) = _shape(layout, "model.layer_norm1.weight", file)
    if hidden != width or in_dim != out_dim * width:
        raise ModelLoadError(
            f"{file}: head of width {hidden} reading {in_dim} features does not fit the language model's "
            f"width {width} x {out_dim} action dims"
        )
    blocks = len({k.split(".")[2] for k in layout if k.startswith("model.mlp_resnet_blocks.")})
    return out_dim, blocks


def proprio_dim(file: Path, width: int) -> int:
    layout = read_layout([file])
    out_dim, in_dim = _shape(layout, "fc1.weight", file)
    if out_dim != width:
        raise ModelLoadError(f"{file}: projects to {out_dim}, the language model is {width} wide")
    return in_dim


def bounds_normalizer(entry: Any, normalization: str, dim: int, where: str) -> nz.Normalizer:
    """One quantity's statistics (dataset_statistics.json's `action` or `proprio`) -> its normaliser:
    q01/q99 (bounds_q99) or min/max (bounds), the mask when present, OFT's eps, clipped when normalising."""
    mode = NORMALIZATIONS[normalization]
    if not isinstance(entry, Mapping):
        raise ModelLoadError(f"{where} is not an object of statistics")
    try:
        stats = nz.Stats.of({k: entry.get(k) for k in (*nz.NEEDED[mode], "mask")}, where)
        normalizer = nz.Normalizer(mode, stats, nz.BOUNDS, eps=RANGE_EPS)
    except nz.StatsError as exc:
        raise ModelLoadError(str(exc)) from None
    if stats.size != dim:
        raise ModelLoadError(f"{where}: {'/'.join(stats.present())} must have {dim} values, got {stats.size}")
    return normalizer


def _platform(action_dim: int | None, proprio: int) -> Platform | None:
    """Upstream's platform whose (action, proprio) dims these are."""
    return next(
        (p for p in PLATFORMS.values() if (p.action_dim, p.proprio_dim) == (action_dim, proprio)), None
    )


def _choices(path: Path, action_dim: int, proprio: int, chosen: OFTChoices) -> tuple[int, int, str]:
    """(chunk size, number of images, normalisation): the settings, else oft_config.json, else upstream's
    platform table; ModelLoadError naming the setting and the file for what none of them says."""
    file = path / OFT_CONFIG_FILE
    raw = read_json(file) if file.is_file() else {}
    platform = _platform(action_dim, proprio)
    values: dict[str, Any] = {}
    for key, setting, attr in CHOSEN:
        candidates = (getattr(chosen, attr), raw.get(key), getattr(platform, attr) if platform else None)
        values[key] = next((v for v in candidates if v is not None), None)
        if values[key] is None:
            raise ModelLoadError(
                f"{path}: the {key} of this checkpoint (action dim {action_dim}, proprio dim {proprio}: no "
                f"upstream platform) is in no {OFT_CONFIG_FILE}; set {setting} or write it into {file}"
            )
    try:
        chunk, images = int(values["num_actions_chunk"]), int(values["num_images_in_input"])
    except (TypeError, ValueError):
        raise ModelLoadError(
            f"{file}: num_actions_chunk and num_images_in_input must be whole numbers"
        ) from None
    normalization = str(values["normalization"])
    if normalization not in NORMALIZATIONS or chunk < 1 or not 1 <= images <= MAX_IMAGES:
        raise ModelLoadError(
            f"{path}: unsupported chunk {chunk} / images {images} / normalization {normalization!r} "
            f"(chunk >= 1, 1 to {MAX_IMAGES} images, normalization {' or '.join(NORMALIZATIONS)})"
        )
    return chunk, images, normalization


def _dataset_stats(path: Path, base: CheckpointInfo) -> dict[str, Any]:
    """dataset_statistics.json when present (it replaces config.json's norm_stats, as upstream's
    _load_dataset_stats does: those are the base model's datasets, without OFT's proprio), else norm_stats."""
    if (path / STATISTICS_FILE).is_file():
        return read_json(path / STATISTICS_FILE)
    return dict(base.raw_config.get("norm_stats") or {})


def read_oft_checkpoint(path: str | Path, chosen: OFTChoices = OFTChoices()) -> OFTCheckpointInfo:
    """Everything but the tensors (headers only); ModelLoadError with what is missing or unsupported."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"OpenVLA-OFT checkpoint directory {path} does not exist")
    _refuse_unsupported(path)
    head_file = _converted(path, HEAD, required=True)
    assert head_file is not None
    proprio_file = _converted(path, PROPRIO, required=False)
    base = read_checkpoint(path)
    components = {head_file, proprio_file}
    base = replace(base, weight_files=[f for f in base.weight_files if f not in components])
    width = base.config.llm.width
    action_dim, blocks = head_dims(head_file, width)
    p_dim = proprio_dim(proprio_file, width) if proprio_file is not None else 0
    chunk, images, normalization = _choices(path, action_dim, p_dim, chosen)
    cfg = OFTConfig(
        vla=base.config,
        chunk_size=chunk,
        action_dim=action_dim,
        proprio_dim=p_dim,
        num_images=images,
        head_blocks=blocks,
    )
    actions: dict[str, nz.Normalizer] = {}
    proprio: dict[str, nz.Normalizer] = {}
    for name, entry in _dataset_stats(path, base).items():
        where = f"dataset statistics [{name!r}]"
        if not isinstance(entry, Mapping) or "action" not in entry:
            raise ModelLoadError(f"{where} has no action statistics")
        actions[name] = bounds_normalizer(entry["action"], normalization, action_dim, where + ".action")
        if p_dim:
            if "proprio" not in entry:
                raise ModelLoadError(
                    f"{where} has no proprio statistics; the checkpoint has a proprio projector"
                )
            proprio[name] = bounds_normalizer(entry["proprio"], normalization, p_dim, where + ".proprio")
    return OFTCheckpointInfo(
        base=base,
        config=cfg,
        normalization=normalization,
        actions=actions,
        proprio=proprio,
        head_file=head_file,
        proprio_file=proprio_file,
    )


def load_oft_model(info: OFTCheckpointInfo, device: str | torch.device, dtype: torch.dtype) -> OpenVLAOFT:
    """The OFT network with the merged shards, the head and the projector streamed into it."""
    cfg = info.config
    return build_and_load(
        lambda: OpenVLAOFT(cfg), info.weight_files, oft_names(cfg), info.path, "OpenVLA-OFT", device, dtype
    )


# ---- conversion (offline; the only place a .pt file is opened) ---------------------------------


def read_pt_state_dict(file: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A `torch.save`d state dict through PyTorch's restricted unpickler (weights_only=True: tensors and
    plain containers only, no code), DDP's `module.` prefix stripped, and the sha256 of the very bytes
    unpickled (read once). Anything but a flat dict of tensors is refused."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {file}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{file}: refused by torch.load(weights_only=True): {reason}") from None
    if not isinstance(state, Mapping) or not state:
        raise ModelLoadError(
            f"{file}: not a state dict (a non-empty dict of tensors), got {type(state).__name__}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or type(value) is not torch.Tensor:
            raise ModelLoadError(f"{file}: not a flat dict of tensors ({key!r} holds {type(value).__name__})")
        name = key.removeprefix(DDP_PREFIX)
        if name in out:
            raise ModelLoadError(f"{file}: {name!r} appears with and without the {DDP_PREFIX!r} prefix")
        out[name] = value.detach().contiguous().clone()  # own storage: safetensors refuses shared views
    return out, digest


def convert_oft_checkpoint(path: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Convert the head and projector `.pt` files of `path` to safetensors beside them and write
    oft_config.json; returns the written files. The chunk size, image count and normalisation come from
    upstream's platform table matched by the (action, proprio) dims, null where no platform matches
    (the server then needs VLA_OFT_*); an existing output is kept unless `overwrite`."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"OpenVLA-OFT checkpoint directory {path} does not exist")
    _refuse_unsupported(path)
    todo: list[tuple[str, Path]] = []
    for name in (HEAD, PROPRIO):
        files = component_files(path, name)
        pickled = _one(path, files["pt"], name)
        if pickled is not None:
            todo.append((name, pickled))
        elif name == HEAD:
            converted = (
                f" (only {files['safetensors'][0].name}: already converted)" if files["safetensors"] else ""
            )
            raise ModelLoadError(f"no {HEAD}--<step>_checkpoint.pt in {path}{converted}")
    targets = [pickled.with_suffix(".safetensors") for _, pickled in todo] + [path / OFT_CONFIG_FILE]
    existing = [t.name for t in targets if t.exists()]
    if existing and not overwrite:
        raise ModelLoadError(
            f"{path} already holds {', '.join(existing)}; remove them or convert with --overwrite"
        )
    converted_files: dict[str, tuple[Path, dict[str, torch.Tensor], str]] = {}
    for name, pickled in todo:  # read and check everything before writing anything
        tensors, digest = read_pt_state_dict(pickled)
        if name == HEAD and "model.fc2.weight" not in tensors:
            raise ModelLoadError(f"{pickled}: no model.fc2.weight: not an L1 regression action head")
        converted_files[name] = (pickled, tensors, digest)
    head = converted_files[HEAD][1]
    action_dim = int(head["model.fc2.weight"].shape[0])
    projector = converted_files.get(PROPRIO)
    proprio = int(projector[1]["fc1.weight"].shape[1]) if projector and "fc1.weight" in projector[1] else 0
    written: list[Path] = []
    for pickled, tensors, digest in converted_files.values():
        target = pickled.with_suffix(".safetensors")
        save_file(
            tensors, str(target), metadata={"format": "pt", "converted_from": pickled.name, "sha256": digest}
        )
        written.append(target)
    platform = _platform(action_dim, proprio)  # None: the server needs VLA_OFT_* for what it would give
    config = {
        "format": "vla-inference openvla-oft",
        "action_dim": action_dim,
        "proprio_dim": proprio,
        **{key: getattr(platform, attr) if platform else None for key, _, attr in CHOSEN},
        "converted_from": {pickled.name: digest for pickled, _, digest in converted_files.values()},
    }
    (path / OFT_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    written.append(path / OFT_CONFIG_FILE)
    return written
