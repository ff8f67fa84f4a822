"""Checkpoint files, one way for every family: JSON configs, safetensors discovery, the layout
check, and streaming the tensors into a model built on `meta`.

A family describes a checkpoint format with a `NameMap`: for each of our parameter names, the
checkpoint tensor(s) that fill it (one, or several rows of a fused projection: HF's q/k/v into
our `qkv`), and which checkpoint tensors the model knowingly leaves out (tensors it never runs,
such as OpenVLA's last ViT block: never allocated). `load_weights`:

1. reads only the headers (names, dtypes, shapes, offsets) of every safetensors file;
2. checks the layout: one error lists the missing, unexpected and mis-shaped tensors (truncated);
3. materialises the model from `meta` on the device, one allocation per parameter;
4. streams each tensor from disk into its parameter: straight into the parameter's memory when it
   lives on the CPU in the file's dtype, else through one tensor-sized buffer. The host never
   holds a second copy of the weights (no memory map, no state dict).

Only JSON and the safetensors format are read: nothing is unpickled or executed.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_inference.models.base import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024
SHOWN = 12  # names listed per kind of layout problem

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- JSON and dtypes ----------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or ModelLoadError saying what is wrong with the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"missing {path.name} in {path.parent}") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """VLA_DTYPE -> torch dtype; "auto" = bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return PRECISIONS[name]


# ---- safetensors headers ------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """Where one checkpoint tensor lies."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorEntry]:
    try:
        with path.open("rb") as handle:
            size_bytes = handle.read(8)
            if len(size_bytes) != 8:
                raise ValueError("shorter than a safetensors header")
            (size,) = struct.unpack("<Q", size_bytes)
            if size > MAX_HEADER_BYTES:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(handle.read(size))
            file_size = path.stat().st_size
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: not a safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"cannot read {path}: the safetensors header is not an object")
    entries = {}
    data_start = 8 + size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(
                f"cannot read {path}: tensor {name!r} has a malformed header entry"
            ) from None
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if begin < 0 or end - begin != nbytes or data_start + end > file_size:
            raise ModelLoadError(
                f"cannot read {path}: tensor {name!r} lies outside the file or has the wrong size"
            )
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, nbytes)
    return entries


def find_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards an index names, else
    model.safetensors, else every *.safetensors file."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no weight_map")
        files = sorted({path / str(name) for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shards that are not in {path}: {', '.join(missing)}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no weights in {path}: expected {SINGLE_FILE}, or {INDEX_FILE} with its shards")
    return files


def read_layout(files: Iterable[Path]) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint by name (headers only)."""
    layout: dict[str, TensorEntry] = {}
    for file in files:
        for name, entry in _read_header(file).items():
            if name in layout:
                raise ModelLoadError(f"tensor {name!r} is in both {layout[name].file.name} and {file.name}")
            layout[name] = entry
    return layout


# ---- name maps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A checkpoint tensor that fills our parameter, or rows [start, stop) of it (fused projections).
    `shape`: the checkpoint's shape when it stores the same values with other singleton dims."""

    key: str
    rows: tuple[int, int] | None = None
    shape: tuple[int, ...] | None = None

    def under(self, prefix: str) -> Source:
        return Source(prefix + self.key, self.rows, self.shape)


def same_name(name: str, shape: tuple[int, ...]) -> list[Source]:
    return [Source(name)]


def _never(key: str) -> bool:
    return False


@dataclass(frozen=True)
class NameMap:
    """One checkpoint format's names for one model: `sources(our name, our shape)` and `unused(key)`
    for the checkpoint tensors the model deliberately does not build."""

    sources: Callable[[str, tuple[int, ...]], list[Source]] = same_name
    unused: Callable[[str], bool] = field(default=_never)

    def to_checkpoint(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict in this format's names (what a writer of the format saves)."""
        out = {}
        for name, tensor in state_dict.items():
            for source in self.sources(name, tuple(tensor.shape)):
                part = tensor if source.rows is None else tensor[source.rows[0] : source.rows[1]]
                shape = source_shape(source, tuple(tensor.shape))
                out[source.key] = part.detach().reshape(shape).contiguous().cpu()
        return out


def source_shape(source: Source, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint tensor's shape for `source`, part of our tensor of `shape`."""
    if source.shape is not None:
        return source.shape
    if source.rows is None:
        return shape
    return (source.rows[1] - source.rows[0], *shape[1:])


# ---- the layout check -----------------------------------------------------------------------


def _listing(items: list[str]) -> str:
    text = ", ".join(items[:SHOWN])
    return text + (f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else "")


def plan(
    model: nn.Module, names: NameMap, layout: Mapping[str, TensorEntry], where: str, what: str
) -> dict[str, tuple[str, Source]]:
    """checkpoint key -> (our name, its source) for every tensor to load; ModelLoadError listing
    what is missing, unexpected and mis-shaped when the checkpoint does not match the model."""
    wanted: dict[str, tuple[str, Source]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict().items():
        for source in names.sources(name, tuple(tensor.shape)):
            wanted[source.key] = (name, source)
            shapes[source.key] = source_shape(source, tuple(tensor.shape))
    missing = sorted(k for k in wanted if k not in layout)
    unexpected = sorted(k for k in layout if k not in wanted and not names.unused(k))
    mis_shaped = sorted(
        f"{k}: file {list(layout[k].shape)}, model {list(shapes[k])}"
        for k in wanted
        if k in layout and layout[k].shape != shapes[k]
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_listing(unexpected)}")
    if mis_shaped:
        problems.append(f"wrong shape {len(mis_shaped)}: {_listing(mis_shaped)}")
    if problems:
        raise ModelLoadError(f"{where} does not match the {what} layout: " + "; ".join(problems))
    return wanted


# ---- streaming --------------------------------------------------------------------------------


def _fill(handle: Any, entry: TensorEntry, dest: torch.Tensor) -> None:
    """Read one tensor from an open file into `dest` (same shape)."""
    handle.seek(entry.start)
    direct = dest.device.type == "cpu" and dest.dtype == entry.dtype and dest.is_contiguous()
    direct = direct and sys.byteorder == "little"  # safetensors stores little-endian
    target = dest if direct else torch.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes:
        view = target.view(-1).view(torch.uint8) if target.dim() else target.reshape(1).view(torch.uint8)
        if handle.readinto(memoryview(view.numpy())) != entry.nbytes:  # type: ignore[arg-type]
            raise ModelLoadError(f"cannot read {entry.file}: it ends before its tensors do")
    if target is not dest:
        dest.copy_(target)


def load_weights(
    model: nn.Module,
    files: Iterable[Path],
    names: NameMap,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    where: str,
    what: str,
) -> nn.Module:
    """Fill `model`, built on the meta device, from safetensors `files`; return it in eval mode on
    `device` in `dtype`. Raises ModelLoadError naming every layout problem before allocating."""
    files = list(files)
    layout = read_layout(files)
    wanted = plan(model, names, layout, where, what)
    try:
        model = model.to(dtype=dtype).to_empty(device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ModelLoadError(f"cannot place the model on {device} as {dtype}: {exc}") from None
    own = dict(model.state_dict(keep_vars=True))
    by_file: dict[Path, list[str]] = {}
    for key in wanted:
        by_file.setdefault(layout[key].file, []).append(key)
    with torch.no_grad():
        for file in files:
            keys = sorted(by_file.get(file, []), key=lambda k: layout[k].start)  # one forward pass
            with file.open("rb") as handle:
                for key in keys:
                    name, source = wanted[key]
                    target = own[name].data
                    if source.rows is not None:
                        target = target[source.rows[0] : source.rows[1]]
                    _fill(handle, layout[key], target.view(layout[key].shape))
    return model.eval()
