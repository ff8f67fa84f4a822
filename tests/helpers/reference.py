"""Copying a reference implementation's weights into our modules through a checkpoint name map, so
that a reference test also checks that the map puts every tensor where the reference expects it."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vla_inference.models.common.weights import NameMap, source_shape


def copy_from_reference(ours: torch.nn.Module, names: NameMap, reference: Mapping[str, torch.Tensor]) -> None:
    """Fill every tensor of `ours` from `reference` (a state dict in the map's checkpoint names)."""
    loaded = {}
    for name, tensor in ours.state_dict().items():
        parts = [
            reference[s.key].reshape(-1, *tensor.shape[1:]) for s in names.sources(name, tuple(tensor.shape))
        ]
        loaded[name] = torch.cat(parts).reshape(tensor.shape)
    ours.load_state_dict(loaded, strict=True)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (norm gains included) so that a mis-wired tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def submap(full: NameMap, ours_prefix: str, theirs_prefix: str) -> NameMap:
    """`full` restricted to one submodule: our names below `ours_prefix`, checkpoint keys below
    `theirs_prefix` (so a reference model's own state dict can be read)."""
    from dataclasses import replace

    def sources(name: str, shape: tuple[int, ...]) -> list:  # type: ignore[type-arg]
        found = full.sources(ours_prefix + name, shape)
        assert all(s.key.startswith(theirs_prefix) for s in found), found
        return [replace(s, key=s.key.removeprefix(theirs_prefix)) for s in found]

    return NameMap(sources)


def checkpoint_shapes(names: NameMap, model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensors (name -> shape) the loader reads for `model` from a checkpoint of this format."""
    shapes = {}
    for name, tensor in model.state_dict().items():
        for source in names.sources(name, tuple(tensor.shape)):
            shapes[source.key] = source_shape(source, tuple(tensor.shape))
    return shapes


def assert_same_layout(ours: Mapping[str, tuple[int, ...]], published: Mapping[str, tuple[int, ...]]) -> None:
    """The loader reads exactly the published tensors: the same names, each of the same shape."""
    assert sorted(set(published) - set(ours)) == []
    assert sorted(set(ours) - set(published)) == []
    assert {k: (ours[k], published[k]) for k in ours if ours[k] != published[k]} == {}
