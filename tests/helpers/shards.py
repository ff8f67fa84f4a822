"""Writing a state dict as Hugging Face safetensors shards, for tiny test checkpoints."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch


def write_two_shards(
    path: Path, state: Mapping[str, torch.Tensor], order: Sequence[str] | None = None
) -> None:
    """`state` as model-00001-of-00002.safetensors (the first half of `order`, sorted names by
    default) and model-00002-of-00002.safetensors (the rest), with model.safetensors.index.json."""
    from safetensors.torch import save_file

    names = list(order) if order is not None else sorted(state)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
