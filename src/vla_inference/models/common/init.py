"""Deterministic random weights from one seed (the random demo model and the start of training)."""

from __future__ import annotations

import math

import torch
from torch import nn

from vla_inference.models.common.transformer import RMSNorm


def init_random_weights(model: nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in) (activations stay O(1)); biases 0; LayerNorm and RMSNorm scales the
    identity (Gemma's zero-centred scale 0); other vectors ~ N(0, 0.02^2). Independent of the
    global RNG."""
    identity: dict[int, float] = {}
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            identity[id(module.weight)] = 1.0
        elif isinstance(module, RMSNorm):
            identity[id(module.weight)] = 0.0 if module.gemma else 1.0
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("bias"):
                value = torch.zeros(param.shape)
            elif id(param) in identity:
                value = torch.full(param.shape, identity[id(param)])
            elif param.ndim >= 2:
                value = torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel())
            else:
                value = torch.randn(param.shape, generator=generator) * 0.02
            param.copy_(value.to(param.dtype))
