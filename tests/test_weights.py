"""The shared checkpoint loader (models/common/weights.py): the layout check and its one error
format, fused and reshaped tensors, dtype conversion, skipped tensors, and host memory.

Memory: a 192 MiB float32 checkpoint in two shards is loaded in a fresh Python process; its peak
resident set (Linux VmHWM, reset through /proc/self/clear_refs just before the load, minus VmRSS
then; it counts every page the process touched, mapped file pages included) grows by about one
copy of the weights, where reading the shards into a state dict first (safetensors.torch.load_file
+ load_state_dict) costs about two.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vla_inference.models.base import ModelLoadError
from vla_inference.models.common.weights import NameMap, Source, find_weight_files, load_weights


class Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.pos = nn.Parameter(torch.zeros(3, 4))
        self.head = nn.Linear(4, 2)


def _names() -> NameMap:
    def sources(name: str, shape: tuple[int, ...]) -> list[Source]:
        if name.startswith("qkv."):
            leaf = name.split(".")[1]
            return [Source(f"attn.{p}.{leaf}", (4 * i, 4 * i + 4)) for i, p in enumerate("qkv")]
        if name == "pos":
            return [Source("pos_embed", shape=(1, 3, 4))]
        return [Source("out." + name)]

    return NameMap(sources, lambda key: key.startswith("unused."))


def _meta() -> Fused:
    with torch.device("meta"):
        return Fused()


def _checkpoint(tmp_path: Path, dtype: torch.dtype = torch.float32) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tensors = {f"attn.{p}.weight": torch.randn(4, 4, generator=g) for p in "qkv"}
    tensors |= {f"attn.{p}.bias": torch.randn(4, generator=g) for p in "qkv"}
    tensors |= {
        "pos_embed": torch.randn(1, 3, 4, generator=g),
        "out.head.weight": torch.randn(2, 4, generator=g),
    }
    tensors |= {
        "out.head.bias": torch.randn(2, generator=g),
        "unused.block.weight": torch.randn(5, generator=g),
    }
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path, tensors


def test_fused_rows_views_and_skipped_tensors(tmp_path: Path) -> None:
    path, tensors = _checkpoint(tmp_path)
    model = load_weights(
        _meta(), find_weight_files(path), _names(), device="cpu", dtype=torch.float32, where="x", what="t"
    )
    assert isinstance(model, Fused)
    torch.testing.assert_close(model.qkv.weight, torch.cat([tensors[f"attn.{p}.weight"] for p in "qkv"]))
    torch.testing.assert_close(model.qkv.bias, torch.cat([tensors[f"attn.{p}.bias"] for p in "qkv"]))
    torch.testing.assert_close(model.pos, tensors["pos_embed"][0])
    torch.testing.assert_close(model.head.weight, tensors["out.head.weight"])
    assert "unused" not in str(dict(model.state_dict()))  # skipped, never allocated
    # the writer's direction is the inverse of the reader's
    assert _names().to_checkpoint(model.state_dict()).keys() == tensors.keys() - {"unused.block.weight"}


def test_bfloat16_file_into_a_float32_model(tmp_path: Path) -> None:
    path, tensors = _checkpoint(tmp_path, torch.bfloat16)
    model = load_weights(
        _meta(), find_weight_files(path), _names(), device="cpu", dtype=torch.float32, where="x", what="t"
    )
    assert model.head.weight.dtype == torch.float32
    torch.testing.assert_close(model.head.weight, tensors["out.head.weight"].float())


def test_one_error_lists_missing_unexpected_and_mis_shaped_truncated(tmp_path: Path) -> None:
    path, tensors = _checkpoint(tmp_path)
    broken = {k: v for k, v in tensors.items() if k != "attn.k.bias"}
    broken["out.head.bias"] = torch.zeros(3)
    broken |= {f"junk.{i:02d}": torch.zeros(1) for i in range(20)}
    for file in path.glob("*.safetensors"):
        file.unlink()
    (path / "model.safetensors.index.json").unlink()
    save_file(broken, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError) as err:
        load_weights(
            _meta(),
            find_weight_files(path),
            _names(),
            device="cpu",
            dtype=torch.float32,
            where="ckpt",
            what="toy",
        )
    message = str(err.value)
    assert message.startswith(
        "ckpt does not match the toy layout: missing 1: attn.k.bias; unexpected 20: junk.00"
    )
    assert "junk.11, ... (8 more)" in message and "junk.12" not in message
    assert message.endswith("wrong shape 1: out.head.bias: file [3], model [2]")


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    save_file({"out.head.weight": torch.zeros(2, 4)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(ModelLoadError, match="lies outside the file"):
        load_weights(
            _meta(),
            [tmp_path / "model.safetensors"],
            NameMap(),
            device="cpu",
            dtype=torch.float32,
            where="x",
            what="t",
        )


_MEASURE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from torch import nn
    from vla_inference.models.common.weights import NameMap, find_weight_files, load_weights

    def build():
        return nn.Sequential(*[nn.Linear(2048, 2048, bias=False) for _ in range(12)])

    path, how = Path(sys.argv[1]), sys.argv[2]
    # warm up the code path on a one-tensor checkpoint, so lazily imported code is not counted
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(4, 4)}, str(path / "warm.st"))
    with torch.device("meta"):
        small = nn.Linear(4, 4, bias=False)
    load_weights(small, [path / "warm.st"], NameMap(), device="cpu", dtype=torch.float32, where="w", what="w")
    with torch.device("meta"):
        model = build()
    def status(key):
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024  # kB

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    if how == "stream":
        model = load_weights(model, find_weight_files(path), NameMap(), device="cpu", dtype=torch.float32,
                             where=str(path), what="probe")
    else:
        from safetensors.torch import load_file
        state = {}
        for file in find_weight_files(path):
            state.update(load_file(str(file)))
        model = build()
        model.load_state_dict(state)
        del state
    print(status("VmHWM") - before)
    """
)


@pytest.mark.slow
def test_peak_host_memory_of_a_sharded_load_is_one_copy_of_the_weights(tmp_path: Path) -> None:
    layers = [torch.randn(2048, 2048) for _ in range(12)]  # 12 x 16 MiB = 192 MiB of float32
    weights = sum(t.numel() * t.element_size() for t in layers)
    tensors = {f"{i}.weight": t for i, t in enumerate(layers)}
    shards = {
        "model-00001-of-00002.safetensors": list(tensors)[:6],
        "model-00002-of-00002.safetensors": list(tensors)[6:],
    }
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, keys in shards.items() for k in keys}})
    )
    del layers, tensors

    def peak(how: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(tmp_path), how],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return int(out.stdout.strip().splitlines()[-1])

    streamed, state_dict_first = peak("stream"), peak("state_dict")
    growth = f"streamed {streamed / weights:.2f}x, state dict first {state_dict_first / weights:.2f}x"
    print(f"peak RSS growth: {growth}")
    assert 0.9 * weights < streamed < 1.15 * weights
    assert state_dict_first > 1.6 * weights  # the measurement tells the two apart
